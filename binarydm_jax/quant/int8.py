"""Integer inference of single-basis binary layers: int8 operands, int32 accumulation, one rescale.

A binary layer with one basis computes y = conv(x_q, sigma * sign(W)) + b, where the LSQ input is
x_q = c * s (signed LSQ, integer codes c) or x_q = c * s + beta (LSQ+). With the int8 weights
sign(W) = +-1 and the int8 codes, the same output is

  signed: y = (s * sigma) * conv_int32(c, sign(W)) + b
  LSQ+:   y = (s * sigma) * conv_int32(c', sign(W)) + (beta' * sigma) * conv_int32(1, sign(W)) + b

LSQ+ codes 0..2^b - 1 are centred to c' = c - 2^(b-1), which fits int8 for every b <= 8, and the
offset becomes beta' = beta + 2^(b-1) * s. `1` is an all-ones input of the layer's spatial shape
convolved with the same padding, so the offset term is exact at zero-padded borders (padding pads
x_q with 0, not with beta). The codes are computed by the same functions as the fake-quant path
(`lsq.lsq_codes`, `lsq.lsq_plus_codes`), so both paths see identical integers; only the float
summation order differs, hence "equal within float tolerance".

Only layers for which `runs_int8` holds take this path; full-precision layers, int-quantized
weights (`weight_bits`), multi-basis layers (k >= 2) and layers with 32-bit inputs stay float.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from binarydm_jax.quant import lsq
from binarydm_jax.quant.policy import BINARY, LayerQuant, QuantPolicy, unwrap_params
from binarydm_jax.quant.ste import sign

FLOAT = "float"
INT8 = "int8"
INFERENCE_MODES = (FLOAT, INT8)


def check_inference(mode: str) -> None:
  """Raises a one-line ValueError unless `mode` is an inference mode ('float' or 'int8')."""
  if mode not in INFERENCE_MODES:
    raise ValueError(f"inference={mode!r}: expected one of {', '.join(map(repr, INFERENCE_MODES))}")


def runs_int8(spec: LayerQuant) -> bool:
  """Whether a layer under `spec` has an integer path: binary, one basis, quantized inputs."""
  return spec.treatment == BINARY and spec.bases == 1 and spec.quantizes_activations


def kernel_signs(kernel: jax.Array) -> jax.Array:
  """sign(kernel) as int8 +-1 (sign(0) = +1); an int8 kernel is taken as already converted."""
  return kernel if kernel.dtype == jnp.int8 else sign(kernel).astype(jnp.int8)


def input_codes(
  x: jax.Array, step: jax.Array, offset: jax.Array | None, bits: int
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """int8 LSQ codes of `x`, the step they multiply and the (centred) offset, None for signed LSQ.

  Args:
    x: the layer input.
    step: the LSQ step `act_step`.
    offset: the LSQ+ offset `act_offset`, or None for signed LSQ.
    bits: activation bits, 2..8.

  Returns:
    (codes, s, beta') with x_q = codes * s (+ beta'), codes of dtype int8.
  """
  if offset is None:
    codes, s = lsq.lsq_codes(x, step, bits)
    return codes.astype(jnp.int8), s, None
  codes, s, beta = lsq.lsq_plus_codes(x, step, offset, bits)
  center = 2 ** (bits - 1)
  return (codes - center).astype(jnp.int8), s, beta + center * s


def int8_params(params: Mapping[str, Any], policy: QuantPolicy) -> Any:
  """Student params with the kernel of every int8-path layer replaced by its int8 signs.

  Optional: the int8 mode also accepts the float kernels and takes their signs in the forward
  pass. Converted params do that work once (and the kernels take a quarter of the memory). They
  still give the same output in the float mode, since sign(+-1) = +-1.

  Args:
    params: student params, `{'params': inner}` or the inner dict (the result has the same form).
    policy: the student's quantization policy; it decides which layers run in int8.

  Returns:
    The same tree; `kernel` of each layer for which `runs_int8` holds is int8 +-1.
  """

  inner = unwrap_params(params)
  converted = _convert_kernels(dict(inner), policy)
  return converted if inner is params else {"params": converted}


@functools.partial(jax.jit, static_argnums=(1,))
def _convert_kernels(params: dict[str, Any], policy: QuantPolicy) -> dict[str, Any]:
  # One compiled program for the whole tree (eagerly, every kernel shape would compile its own).
  def convert(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if keys[-1] == "kernel" and runs_int8(policy.resolve(keys[:-1])):
      return kernel_signs(leaf)
    return leaf

  return jax.tree.map_with_path(convert, params)
