"""Straight-through estimators: the sign binarizer, rounding and LSQ's gradient scaling.

`sign_ste` is the binarizer of BinaryDM: forward maps every value to exactly +1 or -1, backward is
the straight-through estimator clipped to |x| <= 1 (the released code's `BinaryQuantize`).
We choose sign(0) = +1 so that the output is always binary; PyTorch's `torch.sign(0) = 0` would
make a zero weight vanish instead (it only matters for weights that are exactly zero, e.g. a
zero-initialised layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sign(x: jax.Array) -> jax.Array:
  """Elementwise sign with sign(0) = +1, in the dtype of `x`; no custom gradient."""
  return jnp.where(x >= 0, 1, -1).astype(x.dtype)


@jax.custom_vjp
def sign_ste(x: jax.Array) -> jax.Array:
  """Binarizes to {-1, +1} (sign(0) = +1); gradient is g * 1[|x| <= 1] (clipped STE)."""
  return sign(x)


def _sign_ste_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return sign(x), x


def _sign_ste_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  return (jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g)),)


sign_ste.defvjp(_sign_ste_fwd, _sign_ste_bwd)


def round_ste(x: jax.Array) -> jax.Array:
  """Rounds to the nearest integer (half to even, as torch.round); identity gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def scale_grad(x: jax.Array, factor: float | jax.Array) -> jax.Array:
  """Returns `x` unchanged whose gradient is multiplied by `factor` (LSQ's grad_scale)."""
  scaled = x * factor
  return jax.lax.stop_gradient(x - scaled) + scaled
