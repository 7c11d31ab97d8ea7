"""Reference statistics of real images for the Inception metrics, computed once and cached.

A reference holds what the metrics need of the real data, for one dataset and one network:
`mu`, `sigma` (mean and covariance of the 2048-d pool features: FID), `mu_s`, `sigma_s` (of the
2023-d spatial features: sFID) over all images, and `pool`: the pool features of at most
`MAX_FEATURES` = 10,000 of them (a fixed random subset, seed 0), the reference set of
precision/recall (ADM uses 10,000 reference images) and of KID. It is cached as
`ref_{dataset}_{network name}.npz` (the network name ends with its weights hash), and
`load_reference` refuses a file of another dataset or network.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from etils import epath

from binarydm_jax.errors import UserError
from binarydm_jax.evaluation.frechet import feature_statistics
from binarydm_jax.evaluation.inception import InceptionExtractor
from binarydm_jax.runtime import fileio

MAX_FEATURES = 10_000
DEFAULT_CACHE_DIR = "~/.cache/binarydm_jax/reference"
_FORMAT_VERSION = 1


class ReferenceStatsError(UserError, ValueError):
  """A reference cache of another dataset or network, or one that cannot be read."""


def cache_label(dataset: str, origin: Iterable[bytes] | None = None) -> str:
  """The one name of real images in the reference cache (the job's and `evaluate`'s alike).

  A standard split is its dataset name alone ('cifar10'), so a job and `--ref=cifar10` share it;
  other images are `dataset` + '_' + 8 hex digits of the sha256 of `origin` (their files, or where
  they come from), so that two sources never share a cached reference.
  """
  if origin is None:
    return dataset
  digest = hashlib.sha256()
  for chunk in origin:
    digest.update(chunk)
  return f"{dataset}_{digest.hexdigest()[:8]}"


def reference_path(
  cache_dir: str | os.PathLike, dataset: str, extractor: InceptionExtractor
) -> epath.Path:
  """Where the reference of `dataset` under `extractor` is cached."""
  return epath.Path(cache_dir).expanduser() / f"ref_{dataset}_{extractor.name}.npz"


def compute_reference(
  images: np.ndarray, dataset: str, extractor: InceptionExtractor, max_features: int = MAX_FEATURES
) -> dict[str, Any]:
  """The reference of uint8 NHWC RGB `images` (see the module docstring)."""
  features = extractor(images)
  mu, sigma = feature_statistics(features.pool)
  mu_s, sigma_s = feature_statistics(features.spatial)
  keep = np.sort(np.random.default_rng(0).permutation(len(images))[:max_features])
  return {
    "format_version": _FORMAT_VERSION,
    "dataset": dataset,
    "network": extractor.name,
    "network_sha256": extractor.source_sha256,
    "num_images": len(images),
    "mu": mu,
    "sigma": sigma,
    "mu_s": mu_s,
    "sigma_s": sigma_s,
    "pool": features.pool[keep],
  }


def save_reference(path: str | os.PathLike, reference: dict[str, Any]) -> None:
  """Writes `reference` to `path` (a temp file renamed into place)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fileio.write_atomic(path, fileio.npz_bytes(**reference))


def load_reference(
  path: str | os.PathLike, dataset: str, extractor: InceptionExtractor
) -> dict[str, Any]:
  """Reads a cached reference, refusing (one line) one of another dataset, network or format."""
  try:
    with fileio.load_npz(path) as data:
      reference = {key: data[key] for key in data.files}
  except (OSError, ValueError) as e:
    raise ReferenceStatsError(
      f"cannot read the reference {path} ({e}): delete it to recompute"
    ) from e
  for key, want in [
    ("format_version", _FORMAT_VERSION),
    ("dataset", dataset),
    ("network_sha256", extractor.source_sha256),
  ]:
    have = reference.get(key)
    if have is None or have.item() != want:
      raise ReferenceStatsError(
        f"the reference {path} has {key} {None if have is None else have.item()!r}, these "
        f"samples are scored with {want!r}: pass the reference of {dataset} under "
        f"{extractor.name}, or delete the file to recompute it"
      )
  return {key: value.item() if value.ndim == 0 else value for key, value in reference.items()}


def cached_reference(
  dataset: str,
  extractor: InceptionExtractor,
  images_fn: Callable[[], np.ndarray],
  cache_dir: str | os.PathLike,
  path: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], epath.Path]:
  """The reference at `path` (default: `reference_path`), computed from `images_fn()` if absent.

  Returns:
    The reference and the file it was read from or written to.
  """
  path = epath.Path(path) if path else reference_path(cache_dir, dataset, extractor)
  if path.is_file():
    return load_reference(path, dataset, extractor), path
  reference = compute_reference(images_fn(), dataset, extractor)
  save_reference(path, reference)
  return reference, path
