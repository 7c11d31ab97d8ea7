"""Scores of generated uint8 samples against real data (the CLI: `python -m binarydm_jax.evaluate`).

digits: `digits_metrics` (the offline digits CNN) against the held-out split, with the FID against
  the whole real set, its bootstrap interval and KID.
cifar10: FID, sFID, Inception Score, precision/recall and KID x 1e3 (`kid_x1e3`, `kid_std_x1e3`)
  in the FID Inception against reference statistics of the real data (`evaluation.reference`).
images: the same metrics against real images given as uint8 (LSUN, FFHQ, a folder's).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from binarydm_jax.data.input_pipeline import load_dataset
from binarydm_jax.evaluation import inception, reference
from binarydm_jax.evaluation.digits_classifier import DigitsFeatureExtractor
from binarydm_jax.evaluation.digits_fid import digits_metrics
from binarydm_jax.evaluation.frechet import feature_statistics, frechet_distance
from binarydm_jax.evaluation.kid import kid_x1e3
from binarydm_jax.evaluation.metrics import inception_score
from binarydm_jax.evaluation.precision_recall import precision_recall
from binarydm_jax.sampling import samplers
from binarydm_jax.sampling.sample_shards import SamplesError

# 'images': the Inception metrics against any real RGB images given as uint8 (e.g. LSUN, FFHQ).
REFS = ("digits", "cifar10", "images")
CHANNELS = {"digits": 1, "cifar10": 3, "images": 3}
K = 3  # Precision/recall neighbourhood (ADM).
MIN_SAMPLES = {
  "digits": 2,
  "cifar10": K + 1,
  "images": K + 1,
}  # Covariances need 2; the k-th neighbour k + 1.


def check_samples(images: np.ndarray, ref: str) -> None:
  """Raises SamplesError (one line) unless `images` are enough uint8 NHWC images for `ref`."""
  channels = CHANNELS[ref]
  if images.ndim != 4 or images.shape[-1] != channels:
    raise SamplesError(
      f"--ref={ref} needs images of shape (N, H, W, {channels}), got {images.shape}: "
      f"pass {'grayscale' if channels == 1 else 'RGB'} samples as uint8 NHWC under arr_0"
    )
  if images.dtype != np.uint8:
    raise SamplesError(
      f"samples are {images.dtype}, not uint8: save them as "
      "np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8) for x in [-1, 1]"
    )
  if len(images) < MIN_SAMPLES[ref]:
    raise SamplesError(
      f"--ref={ref} needs at least {MIN_SAMPLES[ref]} samples, got {len(images)}: "
      "generate more (the paper scores 50,000)"
    )


def score_digits(images: np.ndarray, seed: int = 0, cache_dir: str | None = None) -> dict:
  """`digits_metrics` of uint8 (N, S, S, 1) samples against the digits set at S px."""
  size = images.shape[1]
  data = ml_collections.ConfigDict(
    {"name": "digits", "image_size": size, "seed": 0, "random_flip": False}
  )
  dataset = load_dataset(data)
  extractor = DigitsFeatureExtractor(size, cache_dir=cache_dir)
  samples = images.astype(np.float32) / 127.5 - 1.0
  result = digits_metrics(samples, dataset.heldout, dataset.train, extractor, seed=seed)
  return {**result, "reference": {"dataset": "digits", "num_images": len(dataset.heldout)}}


def cifar10_train_images(data_dir: str | None) -> np.ndarray:
  """The CIFAR-10 train split as uint8 NHWC (the tfds loader; it must be prepared)."""
  data = ml_collections.ConfigDict(
    {"name": "cifar10", "image_size": 32, "seed": 0, "random_flip": False, "data_dir": data_dir}
  )
  return samplers.to_uint8(load_dataset(data).train)


def reference_cache_label(ref: str, path: str | os.PathLike | None) -> str:
  """The reference cache's dataset name of `--ref`: 'cifar10', or 'images_' + a hash of the real
  images' files (an .npz or a shard directory), so that two sets of real images never share one."""
  if ref == "cifar10":
    return reference.cache_label("cifar10")
  if not path:
    raise SamplesError("--ref=images needs the real images: pass --ref_npz=REAL.npz (arr_0: uint8)")
  root = epath.Path(path)
  if not root.exists():
    raise SamplesError(f"--ref_npz={path} does not exist: pass an .npz or a shard directory")
  files = [root] if root.is_file() else sorted(root.glob("*.npz"))
  return reference.cache_label("images", (file.read_bytes() for file in files))


def score_inception(
  images: np.ndarray,
  ref: dict[str, Any],
  extractor: inception.InceptionExtractor,
  seed: int = 0,
) -> dict[str, Any]:
  """FID, sFID, IS, precision/recall and KID x 1e3 (`kid_x1e3`, `kid_std_x1e3`, with its
  `kid_subset_size`) of uint8 RGB samples against a `reference`."""
  features = extractor(images)
  precision, recall = precision_recall(ref["pool"], features.pool, k=K)
  return {
    "fid": frechet_distance(*feature_statistics(features.pool), ref["mu"], ref["sigma"]),
    "sfid": frechet_distance(*feature_statistics(features.spatial), ref["mu_s"], ref["sigma_s"]),
    "inception_score": inception_score(features.logits_unbiased),
    "precision": precision,
    "recall": recall,
    **kid_x1e3(features.pool, ref["pool"], seed=seed),
    "num_samples": len(images),
    "feature_extractor": extractor.name,
    "feature_extractor_sha256": extractor.source_sha256,
  }


def score_against_reference(
  images: np.ndarray,
  dataset: str,
  extractor: inception.InceptionExtractor,
  reference_images: Callable[[], np.ndarray],
  cache_dir: str | os.PathLike,
  reference_file: str | os.PathLike | None = None,
  seed: int = 0,
) -> dict[str, Any]:
  """`score_inception` against the cached reference of `dataset` (computed if absent).

  Args:
    images: uint8 (N, H, W, 3) samples.
    dataset: the real data's name, e.g. "cifar10".
    extractor: the FID Inception.
    reference_images: returns the real uint8 images; called only when no reference is cached.
    cache_dir: where the reference is cached (`reference.reference_path`).
    reference_file: a reference file to use instead of the cached one.
    seed: seed of KID's subsets.

  Returns:
    `score_inception`'s metrics and `reference`: its dataset, number of images and file.
  """
  ref, path = reference.cached_reference(
    dataset, extractor, reference_images, cache_dir, reference_file
  )
  result = score_inception(images, ref, extractor, seed)
  result["reference"] = {"dataset": dataset, "num_images": ref["num_images"], "file": str(path)}
  return result
