"""Sampling a trained UNet over the device mesh, and saving sample grids as PNG / TensorBoard images."""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image

from binarydm_jax import diffusion
from binarydm_jax.runtime import sharding

# `sampler(params, rng, n) -> n images in [-1, 1]`, as `make_sampler` builds it.
Sampler = Callable[[Any, jax.Array, int], np.ndarray]


def make_sampler(
  model: nn.Module,
  schedule: diffusion.Schedule,
  sampling_config: ml_collections.ConfigDict,
  mesh: Mesh,
  image_shape: tuple[int, int, int],
  decode: Callable[[jax.Array], jax.Array] | None = None,
) -> Sampler:
  """Returns `sample(params, rng, num) -> np.ndarray[num, H, W, C]` in [-1, 1], on all hosts.

  The batch is sharded over the mesh's data axis; each distinct `num` compiles once.
  `image_shape` is what the UNet denoises; with `decode` (a latent diffusion model's first
  stage, `first_stage.FirstStage.decode`) the samples are its images of the final latents.
  """

  @functools.partial(jax.jit, static_argnums=(2,), out_shardings=sharding.data_sharding(mesh))
  def sample(params, rng, num):
    def eps_fn(x, t):
      x = jax.lax.with_sharding_constraint(x, sharding.data_sharding(mesh))
      return model.apply({"params": params}, x, t, train=False)

    shape = (num, *image_shape)
    if sampling_config.sampler == "ddim":
      x0 = diffusion.ddim_sample(
        eps_fn,
        schedule,
        shape,
        rng,
        sampling_config.ddim_steps,
        sampling_config.eta,
        sampling_config.clip_denoised,
      )
    else:
      x0 = diffusion.ddpm_sample(
        eps_fn, schedule, shape, rng, sampling_config.clip_denoised, sampling_config.variance
      )
    return x0 if decode is None else decode(x0)

  def run(params: Any, rng: jax.Array, num: int) -> np.ndarray:
    out = sample(params, rng, num)
    return np.clip(np.asarray(multihost_utils.process_allgather(out, tiled=True)), -1.0, 1.0)

  return run


GRID_MIN_SIZE = 64  # Pixels per grid image at least, so that 16 px digits can be looked at.


def sample_many(
  sampler: Sampler,
  params: Any,
  rng: jax.Array,
  num: int,
  batch_size: int,
) -> np.ndarray:
  """Draws `num` samples in batches of `batch_size` (the last batch is cut to size)."""
  batches = [
    sampler(params, jax.random.fold_in(rng, i), batch_size)
    for i in range(math.ceil(num / batch_size))
  ]
  return np.concatenate(batches)[:num]


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] (clipped) as uint8 pixels 0..255."""
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def upscale(images: np.ndarray, min_size: int) -> np.ndarray:
  """NHWC images enlarged by the smallest integer factor (nearest) that makes them >= min_size."""
  factor = max(1, math.ceil(min_size / min(images.shape[1:3])))
  return images.repeat(factor, axis=1).repeat(factor, axis=2)


def image_grid(
  images: np.ndarray, columns: int | None = None, min_size: int = GRID_MIN_SIZE
) -> np.ndarray:
  """Tiles NHWC images in [-1, 1] into one uint8 grid (H', W', C) with 1px borders: `columns`
  images a row (default: a square-ish grid), each enlarged to at least `min_size` pixels."""
  images = upscale(images, min_size)
  n, h, w, c = images.shape
  cols = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
  pixels = to_uint8(images)
  for i, image in enumerate(pixels):
    r, col = divmod(i, cols)
    grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = image
  return grid


def save_png(grid: np.ndarray, path: str | os.PathLike) -> None:
  """Writes a uint8 HWC grid to `path` (grayscale when C=1), creating the folder.

  The format follows the file name's extension (PNG when it names none that PIL knows).
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image = io.BytesIO()
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
    image, format=Image.registered_extensions().get(path.suffix.lower(), "PNG")
  )
  path.write_bytes(image.getvalue())


def grid_callbacks(config: ml_collections.ConfigDict, workdir: str, writer) -> Callable:
  """`make(name, sampler)` -> a training stage's callback saving EMA sample grids as
  WORKDIR/samples/<name>_<step>.png and TensorBoard images (the same noise every time, so grids
  compare)."""

  def make(name: str, sampler: Sampler) -> Callable[[Any, int], None]:
    def on_sample(state: Any, step: int) -> None:
      grid = image_grid(sampler(state.ema_params, jax.random.PRNGKey(0), config.sampling.grid_size))
      if jax.process_index() == 0:
        save_png(grid, epath.Path(workdir) / "samples" / f"{name}_{step:07d}.png")
      writer.write_images(step, {f"{name}/samples": grid[None]})

    return on_sample

  return make
