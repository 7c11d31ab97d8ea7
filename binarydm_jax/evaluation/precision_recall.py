"""Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's evaluator computes them, in JAX.

Each set of features is a manifold estimate: the union of balls around its points whose squared
radius is the squared L2 distance to the point's k-th nearest neighbour in the same set (k = 3;
the point itself is the 0-th, as in ADM's `np.partition(..., k)`). Precision is the fraction of
sample points inside the reference manifold, recall the fraction of reference points inside the
sample manifold; "inside" is distance <= radius. Distances are ||u||^2 - 2 u.v + ||v||^2 clamped
at 0, in float32 on the device, in blocks of rows against the whole other set. ADM rounds the
same distances to float16 (when all are finite), so a point within float16 rounding of a ball's
surface can land on the other side there; we keep float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _squared_distances(rows: jax.Array, columns: jax.Array) -> jax.Array:
  row_norms = jnp.sum(jnp.square(rows), axis=1)[:, None]
  column_norms = jnp.sum(jnp.square(columns), axis=1)[None, :]
  products = jnp.dot(rows, columns.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(row_norms - 2 * products + column_norms, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_distances(rows: jax.Array, features: jax.Array, k: int) -> jax.Array:
  smallest, _ = jax.lax.top_k(-_squared_distances(rows, features), k + 1)
  return -smallest[:, k]


@jax.jit
def _inside_any_ball(rows: jax.Array, centres: jax.Array, radii: jax.Array) -> jax.Array:
  return jnp.any(_squared_distances(rows, centres) <= radii[None, :], axis=1)


def _by_row_blocks(fn, rows: np.ndarray, batch_size: int, *args) -> np.ndarray:
  """fn(block, *args) over row blocks of `batch_size` (the last padded, so one compiled shape)."""
  batch = min(batch_size, len(rows))
  out = []
  for start in range(0, len(rows), batch):
    block = rows[start : start + batch]
    padded = np.concatenate([block, np.zeros((batch - len(block), rows.shape[1]), rows.dtype)])
    out.append(np.asarray(fn(padded, *args))[: len(block)])
  return np.concatenate(out)


def _as_features(features: np.ndarray, name: str, k: int) -> np.ndarray:
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or len(features) < k + 1:
    raise ValueError(
      f"{name} must have shape (N, D) with N >= k + 1 = {k + 1} to find each point's k-th "
      f"neighbour, got {features.shape}"
    )
  return features


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 1000) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in `features` (itself the 0th).

  Args:
    features: (N, D) features, N >= k + 1.
    k: the neighbourhood size (ADM: 3).
    batch_size: rows per device call; the result does not depend on it.

  Returns:
    float32 (N,) squared radii.
  """
  features = _as_features(features, "features", k)
  device_features = jnp.asarray(features)
  return _by_row_blocks(
    functools.partial(_kth_neighbour_distances, k=k), features, batch_size, device_features
  )


def precision_recall(
  ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3, batch_size: int = 1000
) -> tuple[float, float]:
  """ADM's improved precision and recall of samples against reference features.

  Args:
    ref_features: (N_ref, D) features of the real data (ADM: 10,000 reference images).
    sample_features: (N_sample, D) features of the samples.
    k: the neighbourhood size of the manifold estimates (ADM: 3).
    batch_size: rows per device call; the result does not depend on it.

  Returns:
    (precision, recall) as Python floats in [0, 1].

  Raises:
    ValueError: if either set is not 2-D with more than k rows, or their widths differ.
  """
  ref = _as_features(ref_features, "ref_features", k)
  sample = _as_features(sample_features, "sample_features", k)
  if ref.shape[1] != sample.shape[1]:
    raise ValueError(
      f"ref_features have {ref.shape[1]} dims and sample_features {sample.shape[1]}: "
      "pass features of the same layer"
    )
  ref_radii = jnp.asarray(manifold_radii(ref, k, batch_size))
  sample_radii = jnp.asarray(manifold_radii(sample, k, batch_size))
  in_ref = _by_row_blocks(_inside_any_ball, sample, batch_size, jnp.asarray(ref), ref_radii)
  in_sample = _by_row_blocks(_inside_any_ball, ref, batch_size, jnp.asarray(sample), sample_radii)
  return float(np.mean(in_ref)), float(np.mean(in_sample))
