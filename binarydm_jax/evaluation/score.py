"""Scores of generated uint8 samples against real data (the CLI: `python -m binarydm_jax.evaluate`).

digits: `digits_metrics` (the offline digits CNN) against the held-out split, with the FID against
  the whole real set, its bootstrap interval and KID.
cifar10: FID, sFID, Inception Score, precision/recall and KID x 1e3 (`kid_x1e3`, `kid_std_x1e3`)
  in the FID Inception against reference statistics of the real data (`evaluation.reference`).
images: the same metrics against real images given as uint8 (LSUN, FFHQ, a folder's).

Every result records `num_samples`, per metric its `feature_dims` and `min_samples`, and whether
it is `reliable`; below a metric's minimum (`evaluation.minimums`) scoring is refused in one line
unless few samples are allowed, and then `unreliable` lists why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from binarydm_jax.data.input_pipeline import load_dataset
from binarydm_jax.evaluation import inception, minimums, reference
from binarydm_jax.evaluation.digits_classifier import FEATURE_DIM, DigitsFeatureExtractor
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
# Below these the metrics cannot be computed at all, allowed or not (a covariance needs 2 rows,
# the k-th neighbour k + 1); `digits_needs` and `inception_needs` are what they need to mean much.
MIN_SAMPLES = {
  "digits": 2,
  "cifar10": K + 1,
  "images": K + 1,
}
_MIN_SAMPLES_WHY = {
  "digits": "a covariance needs 2",
  "cifar10": f"precision/recall's k-th neighbour needs k + 1 = {K + 1}",
  "images": f"precision/recall's k-th neighbour needs k + 1 = {K + 1}",
}


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
      f"--ref={ref} needs at least {MIN_SAMPLES[ref]} samples to compute its metrics at all "
      f"({_MIN_SAMPLES_WHY[ref]}), got {len(images)}: generate more (the paper scores 50,000)"
    )


def digits_needs(num_samples: int, num_heldout: int) -> list[minimums.Need]:
  """What the digits metrics need (`minimums`): FID more samples and held-out images than the
  CNN's `FEATURE_DIM` features, KID at least its subset size of samples."""
  return [
    minimums.frechet_need("fid", "FID", FEATURE_DIM, num_samples, num_heldout),
    minimums.kid_need(FEATURE_DIM, num_samples, num_heldout),
  ]


def inception_needs(
  num_samples: int, num_reference: int | None = None, num_reference_pool: int | None = None
) -> list[minimums.Need]:
  """What the Inception metrics need (`minimums`) of the samples and, when given, the reference:
  its images (FID, sFID) and the pool features it keeps (KID, precision/recall)."""
  needs = [
    minimums.frechet_need("fid", "FID", inception.POOL_DIM, num_samples, num_reference),
    minimums.frechet_need("sfid", "sFID", inception.SPATIAL_DIM, num_samples, num_reference),
  ]
  if num_reference_pool is not None:
    needs.append(minimums.kid_need(inception.POOL_DIM, num_samples, num_reference_pool))
  needs.append(
    minimums.precision_recall_need(K, inception.POOL_DIM, num_samples, num_reference_pool)
  )
  return needs


def score_digits(
  images: np.ndarray,
  seed: int = 0,
  cache_dir: str | None = None,
  *,
  allow_few_samples: bool = False,
  fix: str = minimums.CLI_FIX,
) -> dict:
  """`digits_metrics` of uint8 (N, S, S, 1) samples against the digits set at S px, with
  `minimums.judge`'s reliability of `digits_needs` (FewSamplesError before any feature)."""
  size = images.shape[1]
  data = ml_collections.ConfigDict(
    {"name": "digits", "image_size": size, "seed": 0, "random_flip": False}
  )
  dataset = load_dataset(data)
  reliability = minimums.judge(
    digits_needs(len(images), len(dataset.heldout)), allow_few_samples, fix
  )
  extractor = DigitsFeatureExtractor(size, cache_dir=cache_dir)
  samples = images.astype(np.float32) / 127.5 - 1.0
  result = digits_metrics(samples, dataset.heldout, dataset.train, extractor, seed=seed)
  reference_entry = {"dataset": "digits", "num_images": len(dataset.heldout)}
  return {**result, **reliability, "reference": reference_entry}


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
    **kid_x1e3(features.pool, ref["pool"], subset_size=minimums.KID_SUBSET_SIZE, seed=seed),
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
  *,
  allow_few_samples: bool = False,
  fix: str = minimums.CLI_FIX,
) -> dict[str, Any]:
  """`score_inception` against the cached reference of `dataset` (computed if absent).

  What the metrics need (`inception_needs`) is judged on the samples alone before the reference
  is read or computed, then with it before any sample's features.

  Args:
    images: uint8 (N, H, W, 3) samples.
    dataset: the real data's name, e.g. "cifar10".
    extractor: the FID Inception.
    reference_images: returns the real uint8 images; called only when no reference is cached.
    cache_dir: where the reference is cached (`reference.reference_path`).
    reference_file: a reference file to use instead of the cached one.
    seed: seed of KID's subsets.
    allow_few_samples: score below a metric's minimum (the result then says it is unreliable).
    fix: how the user allows few samples, named in the refusal.

  Returns:
    `score_inception`'s metrics, `minimums.judge`'s `reliable`, `unreliable`, `min_samples` and
    `feature_dims`, and `reference`: its dataset, number of images and file.

  Raises:
    FewSamplesError: (one line) below a metric's minimum, unless `allow_few_samples`.
  """
  minimums.judge(inception_needs(len(images)), allow_few_samples, fix)
  ref, path = reference.cached_reference(
    dataset, extractor, reference_images, cache_dir, reference_file
  )
  needs = inception_needs(len(images), int(ref["num_images"]), len(ref["pool"]))
  reliability = minimums.judge(needs, allow_few_samples, fix)
  result = score_inception(images, ref, extractor, seed) | reliability
  result["reference"] = {"dataset": dataset, "num_images": ref["num_images"], "file": str(path)}
  return result
