"""LSQ activation quantizers (Esser et al., 2019) and the asymmetric LSQ+ variant (Bhalgat et al., 2020).

Signed LSQ (the paper's form): x_q = round(clip(x / s, Q_n, Q_p)) * s with Q_n = -2^(b-1),
Q_p = 2^(b-1) - 1, one learnable step `s` per layer whose gradient is scaled by
1 / sqrt(numel(x) * Q_p), and a straight-through gradient for the rounding. numel counts the whole
input tensor, batch included, as the released code does (Esser et al. count the features of one
example).

Asymmetric LSQ+: x_q = round(clip((x - beta) / s, 0, 2^b - 1)) * s + beta with a learnable step `s`
and offset `beta`. It suits inputs that follow SiLU (>= -0.28), where the signed grid wastes about
half of its levels.

Steps are initialised once, by `calibrate_*` on real data: s = 2 * mean|x| / sqrt(Q_p) (the LSQ
init, also the released code's), and for LSQ+ beta = min(x), s = 2 * mean|x - beta| / sqrt(Q_p).
The released code re-runs this init on every forward (its `init_state` typo); we never do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from binarydm_jax.quant.ste import round_ste, scale_grad

FULL_PRECISION_BITS = 32
ACT_BITS_CHOICES = (2, 3, 4, 5, 6, 7, 8, FULL_PRECISION_BITS)
SIGNED = "signed"
ASYMMETRIC = "asymmetric"
ACT_QUANTIZERS = (SIGNED, ASYMMETRIC)
# Floor for calibrated steps, so an all-zero calibration input cannot give a zero step.
MIN_STEP = 1e-8


def signed_range(bits: int) -> tuple[int, int]:
  """(Q_n, Q_p) of the signed b-bit grid: (-2^(b-1), 2^(b-1) - 1)."""
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
  """(Q_n, Q_p) of the unsigned b-bit grid used by LSQ+: (0, 2^b - 1)."""
  return 0, 2**bits - 1


def lsq_grad_factor(numel: int, q_p: int) -> float:
  """LSQ gradient scale g = 1 / sqrt(numel * Q_p)."""
  return 1.0 / math.sqrt(numel * q_p)


def lsq_codes(x: jax.Array, step: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """Signed LSQ codes round(clip(x / s, Q_n, Q_p)) and the step s they multiply, in float32.

  The codes are integers held in float32 (STE rounding); `s` is `step` carrying LSQ's gradient
  scale. `lsq_quantize` is codes * s; the integer inference path casts the same codes to int8.
  """
  q_n, q_p = signed_range(bits)
  s = scale_grad(step, lsq_grad_factor(x.size, q_p))
  x = x.astype(jnp.float32)
  return round_ste(jnp.clip(x / s, q_n, q_p)), s


def lsq_quantize(x: jax.Array, step: jax.Array, bits: int) -> jax.Array:
  """Signed LSQ fake quantization of `x` with step `step` (a scalar), in float32."""
  codes, s = lsq_codes(x, step, bits)
  return codes * s


def lsq_plus_codes(
  x: jax.Array, step: jax.Array, offset: jax.Array, bits: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """LSQ+ codes round(clip((x - beta) / s, 0, 2^b - 1)), step s and offset beta, in float32."""
  q_n, q_p = unsigned_range(bits)
  factor = lsq_grad_factor(x.size, q_p)
  s, beta = scale_grad(step, factor), scale_grad(offset, factor)
  x = x.astype(jnp.float32)
  return round_ste(jnp.clip((x - beta) / s, q_n, q_p)), s, beta


def lsq_plus_quantize(x: jax.Array, step: jax.Array, offset: jax.Array, bits: int) -> jax.Array:
  """Asymmetric LSQ+ fake quantization with learnable `step` and `offset`, in float32."""
  codes, s, beta = lsq_plus_codes(x, step, offset, bits)
  return codes * s + beta


def calibrate_signed(x: jax.Array, bits: int) -> jax.Array:
  """Initial LSQ step 2 * mean|x| / sqrt(Q_p), a float32 scalar."""
  _, q_p = signed_range(bits)
  step = 2.0 * jnp.mean(jnp.abs(x.astype(jnp.float32))) / math.sqrt(q_p)
  return jnp.maximum(step, MIN_STEP)


def calibrate_asymmetric(x: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """Initial LSQ+ (step, offset): offset = min(x), step = 2 * mean|x - offset| / sqrt(Q_p)."""
  _, q_p = unsigned_range(bits)
  x = x.astype(jnp.float32)
  offset = jnp.min(x)
  step = 2.0 * jnp.mean(jnp.abs(x - offset)) / math.sqrt(q_p)
  return jnp.maximum(step, MIN_STEP), offset
