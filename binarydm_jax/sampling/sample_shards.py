"""Many samples in resumable `.npz` shards, over all devices (and hosts); reading them back.

Shard s of the output directory holds samples s * shard_size ... as uint8 NHWC under `arr_0` (the ADM /
torch-fidelity layout), `samples_00000.npz`, `samples_00001.npz`, ... . Sample i is drawn from the
key `fold_in(key(seed), i)` alone (`diffusion.ddim_sample` with per-sample keys), so it does not
depend on the batch size, the device count or which run drew it: a killed generation rerun with
the same flags draws only the missing shards and ends with the samples of an uninterrupted run.
A shard is written to a temp file and renamed (`fileio.write_atomic`), so a half-written one is
never taken as done; a shard that does not read back as the expected array is drawn again.
`generation.json` records the settings, and a rerun with other settings is refused. `load_samples`
reads one `.npz` or a shard directory as one array.

Every process draws every batch (the batch is split over all devices of all hosts) and process 0
writes the shards (the directory must be one all hosts see when it resumes, e.g. `gs://`).
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from binarydm_jax.data.image_folder import IMAGE_SUFFIXES
from binarydm_jax.errors import UserError
from binarydm_jax.runtime import fileio
from binarydm_jax.sampling import samplers
from binarydm_jax.sampling.sampleable import Sampleable, sampler_on, settings

MANIFEST_NAME = "generation.json"
SHARD_PREFIX = "samples_"


class SamplesError(UserError, ValueError):
  """Unreadable samples, or a generation directory that does not fit the request."""


def shard_path(out_dir: str | os.PathLike, index: int) -> epath.Path:
  """The file of shard `index` in `out_dir`."""
  return epath.Path(out_dir) / f"{SHARD_PREFIX}{index:05d}.npz"


def sample_keys(seed: int, indices: np.ndarray) -> jax.Array:
  """One key per sample: `fold_in(key(seed), i)` for each global sample index i."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
    jax.random.key(seed), jnp.asarray(indices, jnp.uint32)
  )


def _read_npz(path: epath.Path) -> np.ndarray:
  """`arr_0` of an .npz, or SamplesError (one line) when it cannot be read."""
  try:
    with fileio.load_npz(path) as data:
      return data["arr_0"]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise SamplesError(
      f"{path} is not an .npz with the samples under arr_0 ({type(e).__name__}: {e}): "
      "write it with np.savez(path, arr_0=images)"
    ) from e


def _shard_done(path: epath.Path, shape: tuple[int, ...]) -> bool:
  """Whether `path` holds a complete uint8 shard of `shape`."""
  if not path.is_file():
    return False
  try:
    images = _read_npz(path)
  except SamplesError:
    return False
  return images.shape == shape and images.dtype == np.uint8


def _check_manifest(out_dir: epath.Path, manifest: dict[str, Any]) -> None:
  """Writes `generation.json`, or refuses a directory generated with other settings."""
  path = out_dir / MANIFEST_NAME
  if path.is_file():
    existing = json.loads(path.read_text())
    changed = sorted(
      k for k in manifest.keys() | existing.keys() if manifest.get(k) != existing.get(k)
    )
    if changed:
      diffs = ", ".join(f"{k} {existing.get(k)!r} -> {manifest.get(k)!r}" for k in changed)
      raise SamplesError(
        f"{out_dir} holds samples generated with other settings ({diffs}): pass the same flags "
        "to resume, or another --out"
      )
    return
  fileio.write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def generation_manifest(
  model: str,
  sampling_settings: ml_collections.ConfigDict,
  num_samples: int,
  shard_size: int,
  seed: int,
  image_shape: tuple[int, ...],
) -> dict[str, Any]:
  """The settings of a generation, as `generation.json` records them (`ddim_steps`, `eta`: DDIM)."""
  ddim = sampling_settings.sampler == "ddim"
  return {
    "model": model,
    "num_samples": num_samples,
    "shard_size": shard_size,
    "seed": seed,
    "image_shape": list(image_shape),
    "sampler": sampling_settings.sampler,
    "ddim_steps": sampling_settings.ddim_steps if ddim else None,
    "eta": sampling_settings.eta if ddim else None,
  }


def generate(
  source: Sampleable,
  out_dir: str | os.PathLike,
  num_samples: int,
  *,
  seed: int = 0,
  sampler: str | None = None,
  steps: int | None = None,
  eta: float | None = None,
  batch_size: int = 256,
  shard_size: int = 1000,
  devices: list | None = None,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Draws the missing shards of `num_samples` samples of `source` into `out_dir`.

  Args:
    source: the model (`sampleable.load`).
    out_dir: the shard directory (created).
    num_samples: samples in all.
    seed: sample i is drawn from `fold_in(key(seed), i)`.
    sampler: "ddim" or "ddpm"; None: the model's config.
    steps: DDIM steps; None: the config's.
    eta: DDIM eta; None: the config's.
    batch_size: samples per compiled call, split over `devices` (divisible by their number).
    shard_size: samples per shard file (the last shard holds the remainder).
    devices: the devices to sample on; None: all devices of all processes.
    log: where the progress lines go (process 0 only).

  Returns:
    The manifest written to `generation.json` (the settings), plus `drawn`: the shards drawn now.

  Raises:
    SamplesError: bad sizes, or `out_dir` holds a generation with other settings.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_samples < 1 or shard_size < 1 or batch_size < 1 or batch_size % len(devices):
    raise SamplesError(
      f"need num_samples, shard_size >= 1 and batch_size a positive multiple of the "
      f"{len(devices)} devices, got {num_samples}, {shard_size} and {batch_size}"
    )
  sampling_settings = settings(source, sampler, steps, eta)
  manifest = generation_manifest(
    source.name, sampling_settings, num_samples, shard_size, seed, source.sample_shape
  )
  return write_shards(
    lambda: sampler_on(source, sampling_settings, devices),
    out_dir,
    manifest,
    batch_size=batch_size,
    log=log,
  )


def write_shards(
  make_sampler: Callable[[], tuple[samplers.Sampler, Any]],
  out_dir: str | os.PathLike,
  manifest: dict[str, Any],
  *,
  batch_size: int,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Draws the missing shards of `manifest`'s samples with a sampler already chosen.

  Args:
    make_sampler: returns `(sample, params)`, `sample(params, keys, num)` drawing one sample per
      key in [-1, 1] on all processes (`samplers.make_sampler`); called only when a shard is
      missing.
    out_dir: the shard directory (created).
    manifest: the settings written to `generation.json`, with at least `num_samples`,
      `shard_size`, `seed` and `image_shape`; a directory holding other settings is refused.
    batch_size: samples per `sample` call (divisible by the sampler's device count).
    log: where the progress lines go (process 0 only).

  Returns:
    `manifest` plus `drawn`: the shards drawn now.
  """
  num_samples, shard_size, seed = (manifest[k] for k in ("num_samples", "shard_size", "seed"))
  image_shape = tuple(manifest["image_shape"])
  out_dir = epath.Path(out_dir)
  num_shards = math.ceil(num_samples / shard_size)

  def shard_shape(index: int) -> tuple[int, ...]:
    return (min(shard_size, num_samples - index * shard_size), *image_shape)

  missing = np.zeros(num_shards, np.int32)
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_manifest(out_dir, manifest)
    missing[:] = [
      not _shard_done(shard_path(out_dir, s), shard_shape(s)) for s in range(num_shards)
    ]
  if jax.process_count() > 1:  # Every process draws the same batches.
    missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
  todo = [s for s in range(num_shards) if missing[s]]
  sample, params = make_sampler() if todo else (None, None)
  total = sum(shard_shape(s)[0] for s in todo)
  done, start_time = 0, time.perf_counter()
  for s in todo:
    count = shard_shape(s)[0]
    first = s * shard_size
    batches = [
      sample(params, sample_keys(seed, np.arange(b, b + batch_size)), batch_size)
      for b in range(first, first + count, batch_size)
    ]
    images = samplers.to_uint8(np.concatenate(batches)[:count])
    done += count
    if jax.process_index() == 0:
      fileio.write_atomic(shard_path(out_dir, s), fileio.npz_bytes(arr_0=images))
      rate = done / (time.perf_counter() - start_time)
      log(
        f"shard {s + 1}/{num_shards}: {done}/{total} images drawn, {rate:.2f} images/s, "
        f"ETA {time.strftime('%H:%M:%S', time.gmtime((total - done) / rate))}"
      )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("binarydm_jax.generate")
  return {**manifest, "drawn": len(todo)}


def load_samples(path: str | os.PathLike) -> np.ndarray:
  """All samples of one `.npz` (`arr_0`) or of a shard directory, in sample order.

  Raises:
    SamplesError: (one line) a missing path, an unreadable file, a directory without shards or
      with a gap (an unfinished generation), or shards of different image shapes or dtypes.
  """
  path = epath.Path(path)
  if path.is_file():
    return _read_npz(path)
  if not path.is_dir():
    raise SamplesError(f"{path} does not exist: pass an .npz or a directory of generate's shards")
  shards = sorted(path.glob(f"{SHARD_PREFIX}[0-9][0-9][0-9][0-9][0-9].npz"))
  if not shards:
    pictures = sorted(p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if pictures:
      raise SamplesError(
        f"{path} holds {len(pictures)} image file(s) ({pictures[0]}, ...) but no "
        f"{SHARD_PREFIX}NNNNN.npz shards: samples are read from generate's shards or one .npz; "
        "pack the images, all of one size, as np.savez(OUT.npz, arr_0=uint8 NHWC array)"
      )
    raise SamplesError(f"{path} holds no {SHARD_PREFIX}NNNNN.npz shards: run generate first")
  expected = [shard_path(path, s) for s in range(len(shards))]
  manifest = path / MANIFEST_NAME
  if manifest.is_file():
    info = json.loads(manifest.read_text())
    expected = [
      shard_path(path, s) for s in range(math.ceil(info["num_samples"] / info["shard_size"]))
    ]
  if shards != expected:
    missing = sorted(set(expected) - set(shards))
    raise SamplesError(
      f"{path} misses {len(missing)} shard(s), first {missing[0].name if missing else '?'}: "
      "rerun generate with the same flags to finish it"
    )
  parts = [_read_npz(p) for p in shards]
  if len({(a.shape[1:], a.dtype) for a in parts}) > 1:
    raise SamplesError(f"the shards of {path} differ in image shape or dtype: regenerate them")
  return np.concatenate(parts)
