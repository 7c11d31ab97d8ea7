"""Low-rank Representation Mimicking (paper §3.3, Eq. 11-14).

The student mimics the FP teacher's block outputs after both are projected onto a fixed PCA subspace
of the teacher's features. The projections are computed once (from the first batches) and kept
fixed; they are training state, not params.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from binarydm_jax.models.unet import BLOCK_OUTPUT_SUFFIX

Features = Mapping[str, jnp.ndarray]
AXES = ("channel", "width")


def _samples(features: jnp.ndarray, axis: str) -> jnp.ndarray:
  """Rows = samples, columns = the projected axis, for NHWC block outputs.

  'channel' (paper): positions are samples, channels the variables.
  'width' (released PyTorch code, which reshapes NCHW to (-1, W)): the image width is projected.
  """
  if axis == "channel":
    return features.reshape(-1, features.shape[-1])
  return jnp.transpose(features, (0, 3, 1, 2)).reshape(-1, features.shape[2])


def projection_rank(dim: int, reduction: int, min_rank: int = 2) -> int:
  """round(dim / K) principal components (paper Eq. 13), at least `min_rank`, at most `dim`."""
  return min(dim, max(min_rank, math.floor(dim / reduction + 0.5)))


def fit_projections(
  teacher_features: Sequence[Features], reduction: int = 4, axis: str = "channel", min_rank: int = 2
) -> dict[str, jnp.ndarray]:
  """PCA basis per block from one or more batches of teacher features: name -> (dim, rank).

  Columns are the eigenvectors of the centered covariance with the largest eigenvalues, in
  descending order (paper Eq. 11-12).
  """
  if axis not in AXES:
    raise ValueError(f"LRM axis={axis!r}; expected one of {AXES}")
  projections = {}
  for name in teacher_features[0]:
    x = jnp.concatenate([_samples(f[name].astype(jnp.float32), axis) for f in teacher_features])
    x = x - x.mean(axis=0, keepdims=True)
    _, eigvecs = jnp.linalg.eigh(x.T @ x / x.shape[0])
    if axis == "channel":
      rank = projection_rank(x.shape[1], reduction, min_rank)
    else:  # The released code: q = W // K, at least 2.
      rank = max(x.shape[1] // reduction, min_rank)
    projections[name] = eigvecs[:, ::-1][:, :rank]
  return projections


def lrm_loss(
  student_features: Features,
  teacher_features: Features,
  projections: Mapping[str, jnp.ndarray],
  axis: str = "channel",
) -> jnp.ndarray:
  """Mean over blocks of the MSE between projected student and teacher features (Eq. 14).

  The teacher side is wrapped in `stop_gradient`; only the student receives gradients.
  """
  losses = []
  for name, proj in projections.items():
    teacher = jax.lax.stop_gradient(_samples(teacher_features[name].astype(jnp.float32), axis))
    student = _samples(student_features[name].astype(jnp.float32), axis)
    losses.append(jnp.mean(jnp.square(student @ proj - teacher @ proj)))
  return jnp.mean(jnp.stack(losses))


def block_features(intermediates: Mapping[str, tuple[jnp.ndarray, ...]]) -> dict[str, jnp.ndarray]:
  """The UNet's sown block outputs (`intermediates` collection) as block name -> array."""
  return {
    name.removesuffix(BLOCK_OUTPUT_SUFFIX): values[0]
    for name, values in intermediates.items()
    if name.endswith(BLOCK_OUTPUT_SUFFIX)
  }
