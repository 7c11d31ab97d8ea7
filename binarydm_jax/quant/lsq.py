"""LSQ activation quantizers (Esser et al., 2019) and the asymmetric LSQ+ variant (Bhalgat et al., 2020).

Signed LSQ (the paper's form): x_q = round(clip(x / s, Q_n, Q_p)) * s with Q_n = -2^(b-1),
Q_p = 2^(b-1) - 1, one learnable step `s` per layer whose gradient is scaled by
1 / sqrt(numel(x) * Q_p), and a straight-through gradient for the rounding. numel counts the whole
input tensor, batch included, as the released code does (Esser et al. count the features of one
example).

Asymmetric LSQ+: x_q = round(clip((x - beta) / s, 0, 2^b - 1)) * s + beta with a learnable step `s`
and offset `beta`. It suits inputs that follow SiLU (>= -0.28), where the signed grid wastes about
half of its levels.

Steps are initialised once, on real data, by one of two rules (`act_init`):
  * 'lsq': s = 2 * mean|x| / sqrt(Q_p) (the LSQ init, also the released code's); for LSQ+ the grid
    spans the data exactly, beta = min(x), s = (max(x) - min(x)) / (2^b - 1);
  * 'mse': the step (and offset) that minimise the mean squared quantization error of the data,
    found by a grid search over clipping ranges (`search_signed`, `search_asymmetric`).
The released code re-runs the LSQ init on every forward (its `init_state` typo), in effect a
dynamic scale; the 'dynamic' quantizer (`dynamic_step`) reproduces that behaviour per sample, as an
option. Otherwise steps are learned and never re-initialised.
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
DYNAMIC = "dynamic"
ACT_QUANTIZERS = (SIGNED, ASYMMETRIC, DYNAMIC)
LSQ_INIT = "lsq"
MSE_INIT = "mse"
ACT_INITS = (LSQ_INIT, MSE_INIT)
# The MSE search: clipping fractions of the data's range tried for each end of the grid, and at
# most this many (evenly strided) elements of the input on which each candidate is scored.
SEARCH_FRACTIONS = tuple(i / 24 for i in range(1, 25))
SEARCH_ELEMENTS = 1 << 16
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
  """Initial LSQ+ (step, offset) whose grid spans the data: min(x) .. max(x) in 2^b - 1 steps.

  (LSQ+'s 2 * mean|x - min| / sqrt(Q_p) would stretch the grid over several times the range of a
  signed input; spanning min..max is right for both kinds.)
  """
  _, q_p = unsigned_range(bits)
  x = x.astype(jnp.float32)
  offset = jnp.min(x)
  step = (jnp.max(x) - offset) / q_p
  return jnp.maximum(step, MIN_STEP), offset


def _search_sample(x: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(B, n) evenly strided elements of each sample of `x` (B*n <= SEARCH_ELEMENTS), weights (B, 1).

  The stride is coprime with the channel count, so every channel is represented (a stride of 64
  on 64 channels would see only channel 0).
  """
  channels = x.shape[-1] if x.ndim > 1 else 1
  x = x.astype(jnp.float32).reshape(x.shape[0], -1)
  stride = max(1, math.ceil(x.size / SEARCH_ELEMENTS))
  while math.gcd(stride, channels) != 1:
    stride += 1
  w = jnp.ones(x.shape[0]) if weights is None else weights.astype(jnp.float32)
  return x[:, ::stride], w[:, None]


def search_signed(x: jax.Array, bits: int, weights: jax.Array | None = None) -> jax.Array:
  """The signed LSQ step minimising the (sample-weighted) squared quantization error of `x`.

  Candidates are s = f * max|x| / Q_p for the fractions f in `SEARCH_FRACTIONS`.

  Args:
    x: calibration inputs, samples on the first axis.
    bits: activation bits.
    weights: (B,) sample weights (e.g. a timestep group's mask); None = all ones. The range is
      taken over the samples of positive weight.
  """
  q_n, q_p = signed_range(bits)
  sample, w = _search_sample(x, weights)
  amax = jnp.max(jnp.where(w > 0, jnp.abs(sample), 0.0))
  steps = jnp.maximum(jnp.asarray(SEARCH_FRACTIONS) * amax / q_p, MIN_STEP)

  def error(s):
    q = jnp.clip(jnp.round(sample / s), q_n, q_p) * s
    return jnp.sum(w * (q - sample) ** 2)

  return steps[jnp.argmin(jax.lax.map(error, steps))]


def search_asymmetric(
  x: jax.Array, bits: int, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """The LSQ+ (step, offset) minimising the (sample-weighted) squared quantization error of `x`.

  The grid's ends are searched independently: hi = f * max(x) and lo = g * min(x) when min(x) < 0
  (else lo = min(x)), for f, g in `SEARCH_FRACTIONS`; then offset = lo, step = (hi - lo) / Q_p.
  Arguments as for `search_signed`.
  """
  _, q_p = unsigned_range(bits)
  sample, w = _search_sample(x, weights)
  lo, hi = _weighted_range(sample, w[:, 0])
  fractions = jnp.asarray(SEARCH_FRACTIONS)
  his = jnp.where(hi > 0, fractions * hi, hi)
  los = jnp.where(lo < 0, fractions * lo, lo)
  grid_lo, grid_hi = (a.ravel() for a in jnp.meshgrid(los, his))
  steps = jnp.maximum((grid_hi - grid_lo) / q_p, MIN_STEP)

  def error(candidate):
    s, beta = candidate
    q = jnp.clip(jnp.round((sample - beta) / s), 0, q_p) * s + beta
    return jnp.sum(w * (q - sample) ** 2)

  best = jnp.argmin(jax.lax.map(error, (steps, grid_lo)))
  return steps[best], grid_lo[best]


def dynamic_step(x: jax.Array, bits: int) -> jax.Array:
  """Per-sample signed step 2 * mean|x_b| / sqrt(Q_p), shaped (B, 1, ..., 1), no gradient.

  The released code's behaviour (its `_ActQ` re-initialises the step on every forward), computed
  per sample instead of per batch, so a sample's output does not depend on its batch.
  """
  _, q_p = signed_range(bits)
  axes = tuple(range(1, x.ndim))
  step = 2.0 * jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True) / math.sqrt(q_p)
  return jax.lax.stop_gradient(jnp.maximum(step, MIN_STEP))


def _weighted_lsq_signed(x: jax.Array, bits: int, weights: jax.Array) -> jax.Array:
  _, q_p = signed_range(bits)
  per_sample = jnp.mean(jnp.abs(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
  mean_abs = jnp.sum(weights * per_sample) / jnp.maximum(jnp.sum(weights), 1e-12)
  return jnp.maximum(2.0 * mean_abs / math.sqrt(q_p), MIN_STEP)


def _weighted_range(x: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  flat = x.astype(jnp.float32).reshape(x.shape[0], -1)
  keep = (weights > 0)[:, None]
  return jnp.min(jnp.where(keep, flat, jnp.inf)), jnp.max(jnp.where(keep, flat, -jnp.inf))


def fit_signed(x: jax.Array, bits: int, init: str, weights: jax.Array | None = None) -> jax.Array:
  """The initial signed step of `x` by `init` ('lsq' or 'mse'), over the samples of `weights`."""
  if init == MSE_INIT:
    return search_signed(x, bits, weights)
  return calibrate_signed(x, bits) if weights is None else _weighted_lsq_signed(x, bits, weights)


def fit_asymmetric(
  x: jax.Array, bits: int, init: str, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """The initial LSQ+ (step, offset) of `x` by `init` ('lsq': min..max, or 'mse')."""
  if init == MSE_INIT:
    return search_asymmetric(x, bits, weights)
  if weights is None:
    return calibrate_asymmetric(x, bits)
  lo, hi = _weighted_range(x, weights)
  return jnp.maximum((hi - lo) / unsigned_range(bits)[1], MIN_STEP), lo
