"""Quantized Conv and Dense: drop-in for nn.Conv/nn.Dense with the same `kernel`/`bias` params.

Each layer looks up its own treatment in the policy by its module path (`self.path`), so the
UNet's `LayerFactory` only has to pass the policy. Extra param leaves sit beside `kernel`/`bias`:
`scale_1..scale_k` (binary bases, per output channel), `act_step` (LSQ), `act_offset` (LSQ+) and
`bias_correction` (the input quantizers and their params: `quant/activations.py`).
A full-precision layer with 32-bit inputs computes exactly what nn.Conv/nn.Dense compute.

We use our own modules rather than Flax's `conv_general_dilated_cls`/`dot_general_cls` hooks
because the hooks receive the kernel already cast to the compute dtype and would nest the scales
under a child module; here the kernel is binarized in float32, then cast to `dtype`.

Inference mode (`inference` field, set for a whole UNet by `quant.with_policy(..., inference=)`):
'float' (default) is the fake-quant forward above. 'int8' runs every single-basis binary layer
with quantized inputs on int8 operands with int32 accumulation (see `quant/int8.py`); all other
layers (full precision, int-quantized weights, two or more bases, 32-bit inputs) keep the float
path. Both modes read the same params; `int8_params` may store the kernels as int8 signs.

Calibration: when the `quant_calib` collection is mutable (outside `init`), every quantized input
fits its steps (offsets, bias correction) on the batch, uses them, and stores them in
`quant_calib`, so that `binarize.calibrate` can copy them into `params`. Otherwise the learned
params are used as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding

from binarydm_jax.quant import activations, int8
from binarydm_jax.quant.policy import BINARY, FULL_PRECISION, INT, LayerQuant, QuantPolicy
from binarydm_jax.quant.weight_binarizer import binarize_kernel, init_scales, int_quantize_kernel

CALIB_COLLECTION = activations.CALIB_COLLECTION
Padding = str | tuple[tuple[int, int], ...]


def _treatment(module: nn.Module) -> LayerQuant:
  policy: QuantPolicy | None = module.policy
  return FULL_PRECISION if policy is None else policy.resolve(module.path)


def _uses_int8(module: nn.Module) -> bool:
  int8.check_inference(module.inference)
  return module.inference == int8.INT8 and int8.runs_int8(_treatment(module))


def _kernel_and_bias(
  module: nn.Module, kernel_shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array | None]:
  kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
  bias = None
  if module.use_bias:
    bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype)
  return kernel, bias


def binary_scales(module: nn.Module, kernel: jax.Array, spec: LayerQuant) -> list[jax.Array]:
  """Creates the `scale_1..scale_k` params of a 'binary' layer (init: `init_scales(kernel)`)."""
  return [
    module.param(f"scale_{i + 1}", lambda _, i=i: init_scales(kernel, spec.bases)[i])
    for i in range(spec.bases)
  ]


def quantize_kernel(module: nn.Module, kernel: jax.Array, spec: LayerQuant) -> jax.Array:
  """The effective kernel of `module` under `spec`; creates `scale_i` params for 'binary'."""
  if spec.treatment == BINARY:
    return binarize_kernel(kernel, binary_scales(module, kernel, spec))
  if spec.treatment == INT:
    return int_quantize_kernel(kernel, spec.weight_bits)
  return kernel


Linear = Callable[[jax.Array, jax.Array, Any], jax.Array]


def quantize_input(
  module: nn.Module, x: jax.Array, spec: LayerQuant, input_split: int | None = None
) -> jax.Array:
  """Fake quantization of a layer input by the spec (`quant/activations.py`); creates its params."""
  if not spec.quantizes_activations:
    return x
  x_q = activations.fake_quantize(x, activations.grids(module, x, spec, input_split), spec.act_bits)
  activations.record_error(module, x, x_q)
  return x_q


def quantized_forward(
  module: nn.Module, x: jax.Array, kernel_shape: tuple[int, ...], linear: Linear
) -> jax.Array:
  """The float (fake-quant) path: kernel and input quantized by the policy, in `dtype`, + bias."""
  spec = _treatment(module)
  kernel, bias = _kernel_and_bias(module, kernel_shape)
  kernel = quantize_kernel(module, kernel, spec)
  x_q = quantize_input(module, x, spec, getattr(module, "input_split", None))
  x_q, kernel, bias = promote_dtype(x_q, kernel, bias, dtype=module.dtype)

  def layer(inputs: jax.Array) -> jax.Array:
    y = linear(inputs, kernel, None)
    return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + (-1,))

  # The bias correction's reference: the same layer on its unquantized input.
  reference = lambda: layer(promote_dtype(x, dtype=module.dtype)[0])  # noqa: E731
  return activations.correct_bias(module, layer(x_q), spec, reference)


def int8_forward(
  module: nn.Module,
  x: jax.Array,
  kernel_shape: tuple[int, ...],
  linear: Linear,
  ones_shape: tuple[int, ...],
) -> jax.Array:
  """The integer path of a layer for which `int8.runs_int8` holds (formulas in `quant/int8.py`).

  Each part of the input (`act_split`) is convolved with its rows of the kernel's signs; steps and
  offsets may differ per sample (timestep groups, 'dynamic').

  Args:
    module: the QuantConv/QuantDense; its params are those of the float path (`kernel` may be
      float or already int8 signs).
    x: the layer input.
    kernel_shape: shape of `kernel`.
    linear: `linear(lhs, rhs, preferred_element_type)`, the layer's conv or dot_general.
    ones_shape: the all-ones input whose `linear` gives the LSQ+ offset term (one example).

  Returns:
    The layer output in `module.dtype` (float32 when None).
  """
  spec = _treatment(module)
  kernel, bias = _kernel_and_bias(module, kernel_shape)
  (scale,) = binary_scales(module, kernel, spec)
  signs = int8.kernel_signs(kernel)
  y = 0.0
  for grid in activations.grids(module, x, spec, getattr(module, "input_split", None)):
    codes, s, shifted_offset = int8.input_codes(
      x[..., grid.part], grid.step, grid.offset, spec.act_bits
    )
    part_signs = signs[..., grid.part, :]
    y = y + linear(codes, part_signs, jnp.int32).astype(jnp.float32) * (s * scale)
    if shifted_offset is not None:
      ones = linear(jnp.ones((*ones_shape[:-1], codes.shape[-1]), jnp.int8), part_signs, jnp.int32)
      y = y + ones.astype(jnp.float32) * (shifted_offset * scale)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  y = activations.correct_bias(module, y, spec, reference=None)  # Calibrated on the float path.
  return y.astype(module.dtype or jnp.float32)


class QuantConv(nn.Module):
  """2-D NHWC convolution with an HWIO `kernel` and `bias`, quantized as the policy says.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).
    use_bias: add a `bias` param.
    dtype: compute dtype (the binarized kernel is cast to it).
    param_dtype: dtype of `kernel` and `bias`; scales and steps are float32.
    kernel_init: initializer of the latent kernel.
    bias_init: initializer of the bias.
    policy: the quantization policy; None = full precision.
    inference: 'float' (fake quantization) or 'int8' (integer path where `int8.runs_int8`).
    input_split: for an input that concatenates two tensors, the channels of the first (what
      `act_split` splits at); None otherwise.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Padding = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  policy: QuantPolicy | None = None
  inference: str = int8.FLOAT
  input_split: int | None = None

  def _conv(self, x: jax.Array, kernel: jax.Array, preferred_element_type: Any = None) -> jax.Array:
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      self.strides,
      canonicalize_padding(self.padding, len(self.kernel_size)),
      lhs_dilation=(1, 1),
      rhs_dilation=(1, 1),
      dimension_numbers=jax.lax.conv_dimension_numbers(
        x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC")
      ),
      feature_group_count=1,
      preferred_element_type=preferred_element_type,
    )

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
    if _uses_int8(self):
      return int8_forward(self, x, kernel_shape, self._conv, (1, *x.shape[1:]))
    return quantized_forward(self, x, kernel_shape, self._conv)


class QuantDense(nn.Module):
  """Dense layer over the last axis with an (in, out) `kernel` and `bias`, quantized by policy.

  Attributes:
    features: output features.
    use_bias: add a `bias` param.
    dtype: compute dtype (the binarized kernel is cast to it).
    param_dtype: dtype of `kernel` and `bias`; scales and steps are float32.
    kernel_init: initializer of the latent kernel.
    bias_init: initializer of the bias.
    policy: the quantization policy; None = full precision.
    inference: 'float' (fake quantization) or 'int8' (integer path where `int8.runs_int8`).
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  policy: QuantPolicy | None = None
  inference: str = int8.FLOAT

  def _dot(self, x: jax.Array, kernel: jax.Array, preferred_element_type: Any = None) -> jax.Array:
    return jax.lax.dot_general(
      x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=preferred_element_type
    )

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_shape = (x.shape[-1], self.features)
    if _uses_int8(self):
      return int8_forward(self, x, kernel_shape, self._dot, (1,) * (x.ndim - 1) + x.shape[-1:])
    return quantized_forward(self, x, kernel_shape, self._dot)
