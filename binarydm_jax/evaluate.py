"""Evaluates trained models by sampling them and scoring the samples; writes WORKDIR/eval.json.

Run as a module it is the sample-scoring CLI of `binarydm_jax.evaluate_cli`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from clu import metric_writers
from etils import epath
from jax.sharding import Mesh

from binarydm_jax import diffusion, sampling, sharding
from binarydm_jax.evaluation.digits_classifier import DigitsFeatureExtractor
from binarydm_jax.evaluation.digits_fid import digits_metrics
from binarydm_jax.fileio import write_atomic
from binarydm_jax.input_pipeline import ImageDataset


def evaluate_model(
  name: str,
  params: Any,
  model: nn.Module,
  schedule: diffusion.Schedule,
  config: ml_collections.ConfigDict,
  dataset: ImageDataset,
  mesh: Mesh,
  workdir: str,
  writer: metric_writers.MetricWriter,
) -> dict[str, Any]:
  """Samples `config.eval.num_samples` images, saves a grid, and scores them with `config.eval.metric`."""
  sharding.check_batch_divisible(config.eval.batch_size, mesh, "config.eval.batch_size")
  image_shape = dataset.train.shape[1:]
  sampler = sampling.make_sampler(model, schedule, config.sampling, mesh, image_shape)
  return evaluate_sampler(name, sampler, params, config, dataset, workdir, writer)


def evaluate_sampler(
  name: str,
  sampler: Callable[[Any, jax.Array, int], np.ndarray],
  params: Any,
  config: ml_collections.ConfigDict,
  dataset: ImageDataset,
  workdir: str,
  writer: metric_writers.MetricWriter,
) -> dict[str, Any]:
  """`evaluate_model` with a sampler already built (e.g. the one a training stage samples with).

  The initial noise comes from `config.eval.seed`, so every model of a run is scored on the same
  noise; the same seed draws the digits metrics' bootstrap and KID subsets.
  """
  image_shape = dataset.train.shape[1:]
  seed = config.eval.seed
  samples = sampling.sample_many(
    sampler, params, jax.random.PRNGKey(seed), config.eval.num_samples, config.eval.batch_size
  )
  grid = sampling.image_grid(samples[: config.sampling.grid_size])
  if jax.process_index() == 0:
    sampling.save_png(grid, epath.Path(workdir) / "samples" / f"{name}_final.png")
  writer.write_images(0, {f"{name}/final_samples": grid[None]})

  if config.eval.metric == "digits_fid":
    extractor = DigitsFeatureExtractor(image_shape[0], cache_dir=config.eval.cache_dir)
    result = digits_metrics(samples, dataset.heldout, dataset.train, extractor, seed=seed)
    low, high = result["fid_ci"]
    scalars = {key: result[key] for key in ("fid", "fid_all", "kid", "kid_std")}
    scalars.update(fid_ci_low=low, fid_ci_high=high)
    writer.write_scalars(0, {f"{name}/digits_{key}": value for key, value in scalars.items()})
  else:
    result = {"num_samples": int(samples.shape[0])}
  result["sampler"] = (
    f"ddim{config.sampling.ddim_steps}" if config.sampling.sampler == "ddim" else "ddpm"
  )
  return result


def write_results(results: dict[str, Any], workdir: str) -> None:
  """Writes `results` to WORKDIR/eval.json atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  write_atomic(epath.Path(workdir) / "eval.json", json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
  # `python -m binarydm_jax.evaluate --samples=... --ref=...`: the CLI lives in `evaluate_cli`,
  # so that importing this module (as the job does) defines no flags.
  from absl import app

  from binarydm_jax import evaluate_cli

  app.run(evaluate_cli.main)
