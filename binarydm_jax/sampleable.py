"""A model to sample, from an export or a job's workdir, and drawing samples from it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from binarydm_jax import diffusion, sampling, sharding, workdir
from binarydm_jax.export import load_export


@dataclasses.dataclass(frozen=True)
class Sampleable:
  """A model and what it needs to be sampled."""

  name: str
  model: Any
  params: Any
  image_shape: tuple[int, int, int]
  diffusion: Any  # ConfigDict of the `diffusion` section.
  sampling: Any  # ConfigDict of the `sampling` section.


def load(
  export_dir: str | None, workdir_path: str | None, which: str, inference: str = "float"
) -> Sampleable:
  """The model of --export (computing in `inference` mode), or the --which model of --workdir."""
  if export_dir:
    model, params, info = load_export(export_dir, inference)
    data = info["data"]
    return Sampleable(
      f"export {export_dir}",
      model,
      params,
      (data["image_size"], data["image_size"], data["channels"]),
      ml_collections.ConfigDict(info["diffusion"]),
      ml_collections.ConfigDict(info["sampling"]),
    )
  trained = (workdir.load_student if which == "student" else workdir.load_teacher_stage)(
    workdir_path
  )
  config = trained.config
  return Sampleable(
    f"{which} of {workdir_path} (step {trained.step})",
    trained.model,
    trained.params,
    workdir.image_shape(config),
    config.diffusion,
    config.sampling,
  )


def settings(
  source: Sampleable,
  sampler: str | None = None,
  steps: int | None = None,
  eta: float | None = None,
) -> ml_collections.ConfigDict:
  """The model's `sampling` settings with the sampler, DDIM steps and eta given (not None) replaced."""
  result = ml_collections.ConfigDict(source.sampling.to_dict())
  result.sampler = sampler or result.sampler
  result.ddim_steps = steps or result.ddim_steps
  result.eta = result.eta if eta is None else eta
  return result


def sampler_on(
  source: Sampleable, sampling_settings: ml_collections.ConfigDict, devices: list
) -> tuple[sampling.Sampler, Any]:
  """`sampling.make_sampler`'s `sample(params, rng, num)` over `devices`, and the params there."""
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict({"data": len(devices), "fsdp": 1}), devices=devices
  )
  schedule = diffusion.schedule_from_config(source.diffusion)
  sample = sampling.make_sampler(
    source.model, schedule, sampling_settings, mesh, source.image_shape
  )
  return sample, jax.device_put(source.params, sharding.replicated(mesh))  # Restored on one device.


def draw(
  source: Sampleable, num: int, sampler: str | None, steps: int | None, seed: int, batch: int
) -> np.ndarray:
  """`num` samples in [-1, 1], NHWC, over as many devices as divide the batch."""
  batch = min(batch, num)
  devices = max(d for d in range(1, jax.device_count() + 1) if batch % d == 0)
  sample, params = sampler_on(source, settings(source, sampler, steps), jax.devices()[:devices])
  return sampling.sample_many(sample, params, jax.random.PRNGKey(seed), num, batch)
