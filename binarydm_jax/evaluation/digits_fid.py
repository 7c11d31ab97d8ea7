"""FID of generated digits against held-out digits, in the offline classifier's feature space."""

from __future__ import annotations

import numpy as np

from binarydm_jax.evaluation import frechet
from binarydm_jax.evaluation.digits_classifier import DigitsFeatureExtractor


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
  if len(samples) < 2 or len(reference) < 2:
    raise ValueError(
      f"digits_fid needs at least 2 samples and 2 reference images, got "
      f"{len(samples)} and {len(reference)}."
    )
  samples = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
  sample_stats = frechet.feature_statistics(extractor.features(samples))
  reference_stats = frechet.feature_statistics(extractor.features(reference))
  return {
    "fid": frechet.frechet_distance(*sample_stats, *reference_stats),
    "num_samples": len(samples),
    "feature_extractor": extractor.name,
  }
