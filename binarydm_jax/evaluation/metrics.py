"""FID, sFID, Inception Score and precision/recall on FID-Inception features, as ADM defines them.

ADM's evaluator (guided-diffusion `evaluations/evaluator.py`, the tool behind the paper's table)
computes, from the outputs of `inception.InceptionV3`:

* FID: the Frechet distance between Gaussians fitted to the 2048-d `pool` features (mean and
  unbiased covariance in float64). `frechet.frechet_distance` evaluates the trace of the matrix
  square root from a symmetric eigendecomposition; it equals ADM's / pytorch-fid's
  `scipy.linalg.sqrtm` formula to ~1e-14 relative on full-rank covariances (tested).
* sFID: the same formula on the 2023-d `spatial` features.
* Inception Score: exp(E_x KL(p(y|x) || p(y))) with p(y|x) the softmax of `logits_unbiased`,
  computed on consecutive splits of `split_size` = 5,000 samples (ADM; the last split may be
  shorter) and averaged; 50,000 samples give 10 splits. torch-fidelity's `isc_features_to_metric`
  instead cuts 10 splits after shuffling with seed 2020: the same number with shuffle=False when
  N = 10 * split_size (tested). Computed in float64.
* precision/recall: `precision_recall.precision_recall` (k = 3, squared L2).
"""

from __future__ import annotations

import numpy as np

from binarydm_jax.evaluation.frechet import feature_statistics, frechet_distance

IS_SPLIT_SIZE = 5000


def fid(features_1: np.ndarray, features_2: np.ndarray) -> float:
  """Frechet distance between two feature sets: FID on `pool`, sFID on `spatial` features.

  Args:
    features_1: (N1, D) features, N1 >= 2.
    features_2: (N2, D) features, N2 >= 2.

  Returns:
    The squared Frechet distance of the fitted Gaussians.
  """
  return frechet_distance(*feature_statistics(features_1), *feature_statistics(features_2))


def inception_score(logits_unbiased: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """ADM's Inception Score: the mean over consecutive splits of exp(mean KL(p(y|x) || p(y))).

  Args:
    logits_unbiased: (N, C) logits without the classifier bias (`InceptionOutputs`).
    split_size: samples per split (ADM: 5,000; the last split holds the remainder).

  Returns:
    The Inception Score (between 1 and C).

  Raises:
    ValueError: if `logits_unbiased` is not a non-empty 2-D array or split_size < 1.
  """
  logits = np.asarray(logits_unbiased, np.float64)
  if logits.ndim != 2 or len(logits) == 0 or split_size < 1:
    raise ValueError(
      f"inception_score needs logits of shape (N >= 1, C) and split_size >= 1, got "
      f"{logits.shape} and {split_size}"
    )
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  scores = []
  for start in range(0, len(log_p), split_size):
    part = log_p[start : start + split_size]
    log_marginal = np.log(np.exp(part).mean(axis=0))
    scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_marginal), axis=1))))
  return float(np.mean(scores))
