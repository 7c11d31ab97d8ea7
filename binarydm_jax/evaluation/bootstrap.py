"""Bootstrap interval of a Frechet distance: how much the score moves with the samples drawn."""

from __future__ import annotations

import numpy as np

from binarydm_jax.evaluation import frechet


def frechet_distance_interval(
  features: np.ndarray,
  reference_mu: np.ndarray,
  reference_sigma: np.ndarray,
  *,
  num_draws: int = 200,
  seed: int = 0,
) -> tuple[float, float]:
  """95% percentile-bootstrap interval of the Frechet distance of `features` to a reference.

  Each draw resamples the rows of `features` with replacement (as many as there are) and scores
  them against the fixed reference statistics; the interval is the 2.5th and 97.5th percentile
  of the draws' distances. The reference is not resampled: the interval is the samples' part of
  the uncertainty, which is what differs between two evaluations of one model.

  Args:
    features: The samples' features, shape (N, D), N >= 2.
    reference_mu: Mean of the reference features, shape (D,).
    reference_sigma: Covariance of the reference features, shape (D, D).
    num_draws: Number of bootstrap draws (>= 2).
    seed: Seed of the resampling; the same seed and inputs give the same interval.

  Returns:
    `(low, high)`, Python floats.

  Raises:
    ValueError: If `num_draws` < 2 or `features` is not (N >= 2, D) of the reference's width.
  """
  if num_draws < 2:
    raise ValueError(f"frechet_distance_interval needs num_draws >= 2, got {num_draws}.")
  features = np.asarray(features, dtype=np.float64)
  rng = np.random.default_rng(seed)
  distances = [
    frechet.frechet_distance(
      *frechet.feature_statistics(features[rng.integers(0, len(features), len(features))]),
      reference_mu,
      reference_sigma,
    )
    for _ in range(num_draws)
  ]
  low, high = np.percentile(distances, [2.5, 97.5])
  return float(low), float(high)
