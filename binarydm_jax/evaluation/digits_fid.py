"""FID of generated digits against real digits, in the offline classifier's feature space."""

from __future__ import annotations

import numpy as np

from binarydm_jax.evaluation import frechet
from binarydm_jax.evaluation.bootstrap import frechet_distance_interval
from binarydm_jax.evaluation.digits_classifier import DigitsFeatureExtractor
from binarydm_jax.evaluation.kid import kid_x1e3

BOOTSTRAP_DRAWS = 200


def digits_fid(
  samples: np.ndarray, reference: np.ndarray, extractor: DigitsFeatureExtractor
) -> dict:
  """Frechet distance between features of samples and of reference images.

  Args:
    samples: Generated images, NHWC with C=1, nominally in [-1, 1]; clipped
      to that range first. At least 2.
    reference: Real images (e.g. the held-out split), same layout. At least 2.
    extractor: The feature network; its name is reported with the score.

  Returns:
    `{"fid": float, "num_samples": int, "feature_extractor": str}`.

  Raises:
    ValueError: If either set has fewer than 2 images (no covariance), or
      the image size does not match the extractor.
  """
  sample_features, reference_features = _features(samples, reference, extractor)
  return {
    "fid": frechet.frechet_distance(
      *frechet.feature_statistics(sample_features),
      *frechet.feature_statistics(reference_features),
    ),
    "num_samples": len(samples),
    "feature_extractor": extractor.name,
  }


def digits_metrics(
  samples: np.ndarray,
  heldout: np.ndarray,
  train: np.ndarray,
  extractor: DigitsFeatureExtractor,
  *,
  seed: int = 0,
) -> dict:
  """`digits_fid` against the held-out split, plus the scores that say how far to trust it.

  Args:
    samples: Generated images, NHWC with C=1, clipped to [-1, 1] first. At least 2.
    heldout: The held-out real images (the primary reference). At least 2.
    train: The training real images; with `heldout` they make the whole real set.
    extractor: The feature network.
    seed: Seed of the bootstrap draws and of the KID subsets.

  Returns:
    `digits_fid`'s `{"fid", "num_samples", "feature_extractor"}` (`fid`: against `heldout`)
    and `fid_all`: the FID against train + held-out; `fid_ci`: `[low, high]`, the 95%
    bootstrap interval of `fid` over `BOOTSTRAP_DRAWS` resamplings of the samples; `kid_x1e3`,
    `kid_std_x1e3`: KID x 1e3 against `heldout`, and `kid_subset_size`: its subsets' size,
    min(1000, samples, held-out images) (`kid.kid_x1e3`).

  Raises:
    ValueError: As `digits_fid`.
  """
  sample_features, heldout_features = _features(samples, heldout, extractor)
  all_features = np.concatenate([extractor.features(train), heldout_features])
  sample_stats = frechet.feature_statistics(sample_features)
  heldout_stats = frechet.feature_statistics(heldout_features)
  return {
    "fid": frechet.frechet_distance(*sample_stats, *heldout_stats),
    "fid_all": frechet.frechet_distance(*sample_stats, *frechet.feature_statistics(all_features)),
    "fid_ci": list(
      frechet_distance_interval(
        sample_features, *heldout_stats, num_draws=BOOTSTRAP_DRAWS, seed=seed
      )
    ),
    **kid_x1e3(sample_features, heldout_features, seed=seed),
    "num_samples": len(samples),
    "feature_extractor": extractor.name,
  }


def _features(
  samples: np.ndarray, reference: np.ndarray, extractor: DigitsFeatureExtractor
) -> tuple[np.ndarray, np.ndarray]:
  """The features of the samples (clipped to [-1, 1]) and of the reference, each >= 2 images."""
  if len(samples) < 2 or len(reference) < 2:
    raise ValueError(
      f"digits_fid needs at least 2 samples and 2 reference images, got "
      f"{len(samples)} and {len(reference)}."
    )
  samples = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
  return extractor.features(samples), extractor.features(reference)
