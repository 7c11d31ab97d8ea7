"""A model to sample, from an export or a job's workdir, and drawing samples from it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from binarydm_jax import diffusion, workdir
from binarydm_jax.data import first_stage
from binarydm_jax.data.first_stage import FirstStage
from binarydm_jax.errors import FlagError
from binarydm_jax.export import load_export
from binarydm_jax.export.manifest import FIRST_STAGE
from binarydm_jax.models.autoencoder import Autoencoder
from binarydm_jax.runtime import sharding
from binarydm_jax.sampling import samplers


@dataclasses.dataclass(frozen=True)
class Sampleable:
  """A model and what it needs to be sampled."""

  name: str
  model: Any
  params: Any
  image_shape: tuple[int, int, int]
  diffusion: Any  # ConfigDict of the `diffusion` section.
  sampling: Any  # ConfigDict of the `sampling` section.
  first_stage: FirstStage | None = None  # Latent diffusion: decodes the sampled latents.

  @property
  def sample_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the samples: `image_shape` (what the UNet denoises), or its decoded images."""
    if self.first_stage is None:
      return self.image_shape
    factor = self.first_stage.config.factor
    height, width, _ = self.image_shape
    return (height * factor, width * factor, self.first_stage.config.out_channels)


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
      _exported_first_stage(export_dir, info),
    )
  trained = (workdir.load_student if which == "student" else workdir.load_teacher_stage)(
    workdir_path
  )
  return from_trained(f"{which} of {workdir_path} (step {trained.step})", trained)


def from_trained(name: str, trained: workdir.TrainedModel) -> Sampleable:
  """A model read back from a workdir, to sample."""
  config = trained.config
  return Sampleable(
    name,
    trained.model,
    trained.params,
    workdir.image_shape(config),
    config.diffusion,
    config.sampling,
    first_stage.from_config(config),
  )


def _exported_first_stage(export_dir: str, info: dict[str, Any]) -> FirstStage | None:
  """The decoder an export of a latent diffusion model ships (None for a pixel-space model)."""
  if "first_stage" not in info:
    return None
  config, params = first_stage.load(epath.Path(export_dir) / FIRST_STAGE)
  return FirstStage(Autoencoder(config), params)


def settings(
  source: Sampleable,
  sampler: str | None = None,
  steps: int | None = None,
  eta: float | None = None,
) -> ml_collections.ConfigDict:
  """The model's `sampling` settings with the sampler, DDIM steps and eta given (not None) replaced.

  Raises:
    FlagError: `steps` outside [1, the model's diffusion.num_timesteps].
  """
  num_timesteps = source.diffusion.num_timesteps
  if steps is not None and not 1 <= steps <= num_timesteps:
    raise FlagError(
      f"--steps={steps}: DDIM steps must be in [1, {num_timesteps}] (the model's "
      "diffusion.num_timesteps)"
    )
  result = ml_collections.ConfigDict(source.sampling.to_dict())
  result.sampler = sampler or result.sampler
  result.ddim_steps = steps or result.ddim_steps
  result.eta = result.eta if eta is None else eta
  return result


def sampler_on(
  source: Sampleable, sampling_settings: ml_collections.ConfigDict, devices: list
) -> tuple[samplers.Sampler, Any]:
  """`samplers.make_sampler`'s `sample(params, rng, num)` over `devices`, and the params there."""
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict({"data": len(devices), "fsdp": 1}), devices=devices
  )
  schedule = diffusion.schedule_from_config(source.diffusion)
  decode = source.first_stage.decode if source.first_stage else None
  sample = samplers.make_sampler(
    source.model, schedule, sampling_settings, mesh, source.image_shape, decode
  )
  return sample, jax.device_put(source.params, sharding.replicated(mesh))  # Restored on one device.


def draw(
  source: Sampleable, num: int, sampler: str | None, steps: int | None, seed: int, batch: int
) -> np.ndarray:
  """`num` samples in [-1, 1], NHWC, over as many devices as divide the batch."""
  batch = min(batch, num)
  devices = max(d for d in range(1, jax.device_count() + 1) if batch % d == 0)
  sample, params = sampler_on(source, settings(source, sampler, steps), jax.devices()[:devices])
  return samplers.sample_many(sample, params, jax.random.PRNGKey(seed), num, batch)
