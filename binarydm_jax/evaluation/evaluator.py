"""Evaluates trained models by sampling them and scoring the samples; writes WORKDIR/eval.json.

`config.eval.metric`: 'digits_fid' (the digits CNN), 'inception' (the FID Inception metrics against
the job's own training images, e.g. CIFAR-10's train split, their reference cached once per source
(`reference_label`); the samples are drawn in resumable shards under WORKDIR/eval_samples, so a
preempted 50,000-sample evaluation continues where it stopped) or 'none'.

Fewer `eval.num_samples` (or reference images) than a metric needs (`evaluation.minimums`) stop
the job before any training (`check_sample_counts`, from `pipeline.setup_job`) and any evaluation,
unless `eval.allow_few_samples`; then every entry of eval.json says `"reliable": false` and why,
as does the evaluation's log line.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from binarydm_jax.data.input_pipeline import ImageDataset
from binarydm_jax.evaluation import inception, minimums, reference, score
from binarydm_jax.evaluation.digits_classifier import DigitsFeatureExtractor
from binarydm_jax.evaluation.digits_fid import digits_metrics
from binarydm_jax.runtime.fileio import write_atomic
from binarydm_jax.sampling import sample_shards, samplers

if TYPE_CHECKING:
  from clu import metric_writers

SHARD_SIZE = 1000  # Samples per resumable shard of the inception metric.
INCEPTION_SCALARS = (
  "fid",
  "sfid",
  "inception_score",
  "precision",
  "recall",
  "kid_x1e3",
  "kid_std_x1e3",
)
DIGITS_SCALARS = ("fid", "fid_all", "kid_x1e3", "kid_std_x1e3")


def check_sample_counts(config: ml_collections.ConfigDict, dataset: ImageDataset) -> dict[str, Any]:
  """`minimums.judge` of `config.eval.num_samples` against the job's reference images.

  digits_fid: the held-out split; inception: the training images (the reference's `num_images`,
  and the at most `reference.MAX_FEATURES` of them it keeps). Nothing for eval.metric='none'.

  Returns:
    The reliability entries (`reliable`, `unreliable`, `min_samples`, `feature_dims`).

  Raises:
    FewSamplesError: (one line) below a metric's minimum, unless `eval.allow_few_samples`.
  """
  num = config.eval.num_samples
  if config.eval.metric == "digits_fid":
    needs = score.digits_needs(num, len(dataset.heldout))
  elif config.eval.metric == "inception":
    num_real = len(dataset.train)
    needs = score.inception_needs(num, num_real, min(num_real, reference.MAX_FEATURES))
  else:
    return {}
  return minimums.judge(needs, _allow_few_samples(config), minimums.CONFIG_FIX)


def _allow_few_samples(config: ml_collections.ConfigDict) -> bool:
  return bool(config.eval.get("allow_few_samples", False))


def evaluate_sampler(
  name: str,
  sampler: samplers.Sampler,
  params: Any,
  config: ml_collections.ConfigDict,
  dataset: ImageDataset,
  workdir: str,
  writer: metric_writers.MetricWriter,
  model_id: str = "",
) -> dict[str, Any]:
  """Draws `config.eval.num_samples` with `sampler`, saves a grid, scores by `config.eval.metric`.

  The initial noise comes from `config.eval.seed`, so every model of a run is scored on the same
  noise; the same seed draws the digits metrics' bootstrap and the KID subsets.

  Raises:
    FewSamplesError: (one line, before any sample is drawn) `config.eval.num_samples` below what
      a metric needs (`check_sample_counts`), unless `config.eval.allow_few_samples`.
  """
  reliability = check_sample_counts(config, dataset)
  image_shape = dataset.train.shape[1:]
  seed = config.eval.seed
  if config.eval.metric == "inception":
    images, generation = _draw_shards(name, model_id, sampler, params, config, image_shape, workdir)
    shown = images[: config.sampling.grid_size].astype(np.float32) / 127.5 - 1.0
  else:
    samples = samplers.sample_many(
      sampler, params, jax.random.PRNGKey(seed), config.eval.num_samples, config.eval.batch_size
    )
    shown = samples[: config.sampling.grid_size]
  grid = samplers.image_grid(shown)
  if jax.process_index() == 0:
    samplers.save_png(grid, epath.Path(workdir) / "samples" / f"{name}_final.png")
  writer.write_images(0, {f"{name}/final_samples": grid[None]})

  if config.eval.metric == "digits_fid":
    extractor = DigitsFeatureExtractor(image_shape[0], cache_dir=config.eval.cache_dir)
    result = digits_metrics(samples, dataset.heldout, dataset.train, extractor, seed=seed)
    result |= reliability
    low, high = result["fid_ci"]
    scalars = {key: result[key] for key in DIGITS_SCALARS}
    scalars.update(fid_ci_low=low, fid_ci_high=high)
    writer.write_scalars(0, {f"{name}/digits_{key}": value for key, value in scalars.items()})
  elif config.eval.metric == "inception":
    result = _inception_metrics(images, config, dataset) | {"generation": generation}
    writer.write_scalars(0, {f"{name}/{key}": result[key] for key in INCEPTION_SCALARS})
  else:
    result = {"num_samples": int(samples.shape[0])}
  result["sampler"] = (
    f"ddim{config.sampling.ddim_steps}" if config.sampling.sampler == "ddim" else "ddpm"
  )
  if config.eval.metric != "none":
    log = logging.info if result["reliable"] else logging.warning
    log("%s evaluation (%s): %s", name, config.eval.metric, minimums.headline(result))
  return result


def _draw_shards(
  name: str,
  model_id: str,
  sampler: samplers.Sampler,
  params: Any,
  config: ml_collections.ConfigDict,
  image_shape: tuple[int, ...],
  workdir: str,
) -> tuple[np.ndarray, dict[str, Any]]:
  """The uint8 eval samples, drawn (or resumed) in shards under WORKDIR/eval_samples.

  The directory is named by the model and a hash of the generation's settings, so a rerun with
  other settings or another model draws into a fresh directory instead of mixing samples.
  """
  label = f"{name} ({model_id})" if model_id else name
  manifest = sample_shards.generation_manifest(
    label,
    config.sampling,
    config.eval.num_samples,
    SHARD_SIZE,
    config.eval.seed,
    image_shape,
  )
  digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:8]
  out_dir = epath.Path(workdir) / "eval_samples" / f"{name}_{digest}"
  result = sample_shards.write_shards(
    lambda: (sampler, params),
    out_dir,
    manifest,
    batch_size=config.eval.batch_size,
    log=lambda line: logging.info("%s eval samples: %s", name, line),
  )
  return sample_shards.load_samples(out_dir), {**result, "dir": str(out_dir)}


def reference_label(config: ml_collections.ConfigDict, image_size: int) -> str:
  """Names the real images of a job in the reference cache: 'cifar10' (the CLI's --ref), else
  the data source, resolution and a hash of where the images come from, so that two folders or
  resolutions never share a cached reference."""
  data = config.data
  if data.name == "cifar10" and image_size == 32:
    return reference.cache_label("cifar10")
  origin = json.dumps(
    [data.get("data_dir"), data.get("max_images"), data.get("num_images")], sort_keys=True
  )
  return reference.cache_label(f"{data.name}{image_size}", [origin.encode()])


def _inception_metrics(
  images: np.ndarray, config: ml_collections.ConfigDict, dataset: ImageDataset
) -> dict[str, Any]:
  """`score.score_against_reference` of uint8 samples against the job's training images (the
  whole training set, as the paper's FID reference batches)."""
  extractor = inception.load_inception(config.eval.inception_dir)
  cache_dir = (
    epath.Path(config.eval.cache_dir) / "reference"
    if config.eval.cache_dir
    else reference.DEFAULT_CACHE_DIR
  )
  return score.score_against_reference(
    images,
    reference_label(config, images.shape[1]),
    extractor,
    lambda: samplers.to_uint8(dataset.train),
    cache_dir,
    seed=config.eval.seed,
    allow_few_samples=_allow_few_samples(config),
    fix=minimums.CONFIG_FIX,
  )


def write_results(results: dict[str, Any], workdir: str) -> None:
  """Writes `results` to WORKDIR/eval.json atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  write_atomic(epath.Path(workdir) / "eval.json", json.dumps(results, indent=2, sort_keys=True))
