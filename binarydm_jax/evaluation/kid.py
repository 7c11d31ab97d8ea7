"""Kernel distance (KID) between two sets of features: unbiased MMD^2, cubic polynomial kernel.

The estimator of Binkowski et al. (2018) as torch-fidelity computes it: the mean and the standard
deviation of the unbiased MMD^2 over random subsets of both sets, with the kernel
k(x, y) = (x.y / d + 1)^3 on d-dimensional features. Subsets are drawn as torch-fidelity 0.4
draws them (numpy `RandomState(seed)`, per subset one `choice` without replacement from the
first set, then one from the second), so the same features and seed give its numbers (it
computes in the features' dtype, float32 for its extractors; here float64).

The scores' results carry KID in the unit papers' tables use, x 1e3 (e.g. StyleGAN2-ADA's
"KID x 10^3"), with the unit in the key: `kid_x1e3` and `kid_std_x1e3` (function `kid_x1e3`).
`kid`, like torch-fidelity's output, is the raw MMD^2, a thousandth of that.
"""

from __future__ import annotations

import numpy as np

KID_SCALE = 1e3  # Results report KID x 1e3, in keys that say so (`kid_x1e3`).


def kid(
  features_a: np.ndarray,
  features_b: np.ndarray,
  *,
  subset_size: int = 1000,
  num_subsets: int = 100,
  seed: int = 0,
) -> dict[str, float]:
  """KID between two feature matrices, in float64.

  The subset size is `min(subset_size, len(features_a), len(features_b))`: both subsets of a
  draw have that size, and a set no larger than it enters every draw whole (torch-fidelity
  instead refuses a `subset_size` above either set's size).

  Args:
    features_a: Shape (N, D), e.g. the generated samples' features.
    features_b: Shape (M, D), e.g. the real images' features.
    subset_size: Rows drawn from each set per subset, before clipping to the smaller set.
    num_subsets: Number of subsets averaged.
    seed: Seed of the subset draws; the same seed and features give the same result.

  Returns:
    `{"kid": mean, "kid_std": std}`: the mean of the per-subset MMD^2 estimates and their
    standard deviation (numpy's population std, as torch-fidelity reports it).

  Raises:
    ValueError: If the features are not 2-D with equal widths, a set has fewer than 2 rows
      (the unbiased estimator divides by m (m - 1)), or `subset_size` or `num_subsets` is
      below what the estimator needs.
  """
  features_a = np.asarray(features_a, dtype=np.float64)
  features_b = np.asarray(features_b, dtype=np.float64)
  if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
    raise ValueError(
      f"kid needs feature matrices (N, D) and (M, D) of the same width D, got shapes "
      f"{features_a.shape} and {features_b.shape}."
    )
  if subset_size < 2 or num_subsets < 1:
    raise ValueError(
      f"kid needs subset_size >= 2 and num_subsets >= 1, got {subset_size} and {num_subsets}."
    )
  size = min(subset_size, len(features_a), len(features_b))
  if size < 2:
    raise ValueError(
      f"kid needs at least 2 rows in each set, got {len(features_a)} and {len(features_b)}."
    )
  rng = np.random.RandomState(seed)
  estimates = np.empty(num_subsets)
  for i in range(num_subsets):
    subset_a = features_a[rng.choice(len(features_a), size, replace=False)]
    subset_b = features_b[rng.choice(len(features_b), size, replace=False)]
    estimates[i] = unbiased_mmd2(subset_a, subset_b)
  return {"kid": float(estimates.mean()), "kid_std": float(estimates.std())}


def kid_x1e3(
  features_a: np.ndarray,
  features_b: np.ndarray,
  *,
  subset_size: int = 1000,
  num_subsets: int = 100,
  seed: int = 0,
) -> dict[str, float | int]:
  """`kid` in the results' unit, x 1e3, with the subset size it drew.

  Returns:
    `{"kid_x1e3": 1e3 * kid, "kid_std_x1e3": 1e3 * kid_std, "kid_subset_size": rows per subset
    of each set, min(subset_size, len(features_a), len(features_b))}`.

  Raises:
    ValueError: As `kid`.
  """
  raw = kid(features_a, features_b, subset_size=subset_size, num_subsets=num_subsets, seed=seed)
  return {
    "kid_x1e3": raw["kid"] * KID_SCALE,
    "kid_std_x1e3": raw["kid_std"] * KID_SCALE,
    "kid_subset_size": min(subset_size, len(features_a), len(features_b)),
  }


def unbiased_mmd2(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Unbiased MMD^2 of two equally sized sets under the cubic polynomial kernel.

  (sum_{i != j} k(a_i, a_j) + sum_{i != j} k(b_i, b_j)) / (m (m - 1)) - 2 sum_{i,j} k(a_i, b_j) / m^2.

  Args:
    features_a: Shape (m, D), m >= 2.
    features_b: Shape (m, D).

  Returns:
    The estimate as a Python float; it can be slightly negative for similar sets.
  """
  m = len(features_a)
  kernel_aa = polynomial_kernel(features_a, features_a)
  kernel_bb = polynomial_kernel(features_b, features_b)
  kernel_ab = polynomial_kernel(features_a, features_b)
  within = kernel_aa.sum() - np.trace(kernel_aa) + kernel_bb.sum() - np.trace(kernel_bb)
  return float(within / (m * (m - 1)) - 2.0 * kernel_ab.sum() / (m * m))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """k(x, y) = (x.y / d + 1)^3 for all row pairs: shape (len(x), len(y))."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3
