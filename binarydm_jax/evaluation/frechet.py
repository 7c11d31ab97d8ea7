"""Frechet distance between Gaussians fitted to two sets of features (the FID formula)."""

from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of a feature matrix.

  Args:
    features: Shape (N, D), one row per sample; N >= 2.

  Returns:
    `(mu, sigma)`: the float64 mean (D,) and covariance (D, D), unbiased,
    with rows as observations.

  Raises:
    ValueError: If `features` is not 2-D or has fewer than 2 rows.
  """
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"Need features of shape (N >= 2, D), got {features.shape}.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}), in
  float64. Instead of a general matrix square root, Tr (sigma1 sigma2)^{1/2}
  is the sum of the square roots of the eigenvalues of the symmetric matrix
  sigma1^{1/2} sigma2 sigma1^{1/2}, which has the same spectrum as
  sigma1 sigma2; eigenvalues are clipped at 0 against round-off.

  Args:
    mu1: Mean of the first set, shape (D,).
    sigma1: Covariance of the first set, shape (D, D).
    mu2: Mean of the second set, shape (D,).
    sigma2: Covariance of the second set, shape (D, D).

  Returns:
    The squared Frechet distance as a Python float.

  Raises:
    ValueError: If the shapes do not agree.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  dim = mu1.shape[0]
  if (
    mu1.shape != (dim,)
    or mu2.shape != (dim,)
    or sigma1.shape != (dim, dim)
    or sigma2.shape != (dim, dim)
  ):
    raise ValueError(
      f"Shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
      f"mu2 {mu2.shape}, sigma2 {sigma2.shape}."
    )
  sqrt_sigma1 = _psd_sqrt(sigma1)
  inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
  eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2.0)
  trace_sqrt_product = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a (numerically) positive semi-definite matrix."""
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
