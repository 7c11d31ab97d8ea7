"""Multi-basis weight binarizer (BinaryDM Eq. 5) and the 8-bit weight quantizer of the boundary option.

With k bases the effective kernel is sum_i sigma_i * sign(r_i), where r_1 = W and
r_{i+1} = r_i - sigma_i * sign(r_i): basis i binarizes the residual left by bases 1..i-1.
The scales sigma_i are per output channel (the kernel's last axis, for both HWIO conv kernels and
(in, out) dense kernels). Gradients to W and to every sigma_i follow from the clipped STE by
autodiff, as in the released code; the residual keeps W and sigma_1 differentiable in basis 2.

Scale init: sigma_i = mean|r_i| over the non-output axes (l1 / n, the released code's choice and
XNOR-Net's optimum). The paper writes ||w|| / n with the l2 norm; we follow the code.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from binarydm_jax.quant.ste import round_ste, sign, sign_ste


def _reduce_axes(kernel: jax.Array) -> tuple[int, ...]:
  return tuple(range(kernel.ndim - 1))


def init_scales(kernel: jax.Array, bases: int) -> tuple[jax.Array, ...]:
  """Per-output-channel scales (sigma_1, ..., sigma_k) from a kernel, float32, shape (out,).

  Args:
    kernel: a conv (H, W, in, out) or dense (in, out) kernel.
    bases: number of binary bases k >= 1.

  Returns:
    k arrays: sigma_i = mean|r_i| with r_1 = kernel, r_{i+1} = r_i - sigma_i * sign(r_i).
  """
  residual = jnp.asarray(kernel, jnp.float32)
  scales = []
  for _ in range(bases):
    scale = jnp.mean(jnp.abs(residual), axis=_reduce_axes(residual))
    scales.append(scale)
    residual = residual - scale * sign(residual)
  return tuple(scales)


def binarize_kernel(kernel: jax.Array, scales: Sequence[jax.Array]) -> jax.Array:
  """Effective kernel sum_i sigma_i * sign_ste(r_i) (Eq. 5 for k = 2), float32.

  Args:
    kernel: latent full-precision kernel, output channels on the last axis.
    scales: k per-output-channel scales, each of shape (out,).

  Returns:
    The binarized kernel; each output channel takes at most 2^k distinct values.
  """
  residual = jnp.asarray(kernel, jnp.float32)
  out = jnp.zeros_like(residual)
  for scale in scales:
    basis = scale.astype(jnp.float32) * sign_ste(residual)
    out = out + basis
    residual = residual - basis
  return out


def int_quantize_kernel(kernel: jax.Array, bits: int) -> jax.Array:
  """Symmetric per-output-channel fake quantization to `bits` bits (absmax scale, STE rounding).

  Used for the boundary layers when `fp_boundary_bits = 8` (the paper appendix's "8-bit first and
  last layers"). The scale is recomputed from the kernel and gets no gradient.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  q_p = 2 ** (bits - 1) - 1
  scale = jax.lax.stop_gradient(int_weight_scale(kernel, bits))
  return round_ste(jnp.clip(kernel / scale, -q_p, q_p)) * scale


def int_weight_scale(kernel: jax.Array, bits: int) -> jax.Array:
  """The per-output-channel step of `int_quantize_kernel`: max|kernel| / (2^(bits-1) - 1)."""
  absmax = jnp.max(jnp.abs(jnp.asarray(kernel, jnp.float32)), axis=_reduce_axes(kernel))
  return jnp.maximum(absmax, 1e-12) / (2 ** (bits - 1) - 1)
