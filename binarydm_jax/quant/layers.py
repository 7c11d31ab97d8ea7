"""Quantized Conv and Dense: drop-in for nn.Conv/nn.Dense with the same `kernel`/`bias` params.

Each layer looks up its own treatment in the policy by its module path (`self.path`), so the
UNet's `LayerFactory` only has to pass the policy. Extra param leaves sit beside `kernel`/`bias`:
`scale_1..scale_k` (binary bases, per output channel), `act_step` (LSQ) and `act_offset` (LSQ+).
A full-precision layer with 32-bit inputs computes exactly what nn.Conv/nn.Dense compute.

We use our own modules rather than Flax's `conv_general_dilated_cls`/`dot_general_cls` hooks
because the hooks receive the kernel already cast to the compute dtype and would nest the scales
under a child module; here the kernel is binarized in float32, then cast to `dtype`.

Calibration: when the `quant_calib` collection is mutable (outside `init`), every quantized input
recomputes its LSQ step from the batch, uses it, and stores it in `quant_calib`, so that
`binarize.calibrate` can copy it into `params`. Otherwise the learned `act_step` is used as is.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding

from binarydm_jax.quant import lsq
from binarydm_jax.quant.policy import BINARY, FULL_PRECISION, INT, LayerQuant, QuantPolicy
from binarydm_jax.quant.weight_binarizer import binarize_kernel, init_scales, int_quantize_kernel

CALIB_COLLECTION = "quant_calib"
Padding = str | tuple[tuple[int, int], ...]


def _treatment(module: nn.Module) -> LayerQuant:
  policy: QuantPolicy | None = module.policy
  return FULL_PRECISION if policy is None else policy.resolve(module.path)


def quantize_kernel(module: nn.Module, kernel: jax.Array, spec: LayerQuant) -> jax.Array:
  """The effective kernel of `module` under `spec`; creates `scale_i` params for 'binary'."""
  if spec.treatment == BINARY:
    scales = [
      module.param(f"scale_{i + 1}", lambda _, i=i: init_scales(kernel, spec.bases)[i])
      for i in range(spec.bases)
    ]
    return binarize_kernel(kernel, scales)
  if spec.treatment == INT:
    return int_quantize_kernel(kernel, spec.weight_bits)
  return kernel


def quantize_input(module: nn.Module, x: jax.Array, spec: LayerQuant) -> jax.Array:
  """LSQ/LSQ+ fake quantization of a layer input; creates `act_step` (and `act_offset`)."""
  if not spec.quantizes_activations:
    return x
  bits = spec.act_bits
  calibrating = module.is_mutable_collection(CALIB_COLLECTION) and not module.is_initializing()
  if spec.act_quantizer == lsq.SIGNED:
    step = module.param("act_step", lambda _: lsq.calibrate_signed(x, bits))
    if calibrating:
      step = lsq.calibrate_signed(x, bits)
      module.put_variable(CALIB_COLLECTION, "act_step", step)
    return lsq.lsq_quantize(x, step, bits)
  step = module.param("act_step", lambda _: lsq.calibrate_asymmetric(x, bits)[0])
  offset = module.param("act_offset", lambda _: lsq.calibrate_asymmetric(x, bits)[1])
  if calibrating:
    step, offset = lsq.calibrate_asymmetric(x, bits)
    module.put_variable(CALIB_COLLECTION, "act_step", step)
    module.put_variable(CALIB_COLLECTION, "act_offset", offset)
  return lsq.lsq_plus_quantize(x, step, offset, bits)


def quantized_operands(
  module: nn.Module, x: jax.Array, kernel_shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Creates `kernel`/`bias`, quantizes kernel and input by the policy, casts all to `dtype`."""
  spec = _treatment(module)
  kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
  bias = None
  if module.use_bias:
    bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype)
  kernel = quantize_kernel(module, kernel, spec)
  x = quantize_input(module, x, spec)
  return promote_dtype(x, kernel, bias, dtype=module.dtype)


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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = quantized_operands(self, x, (*self.kernel_size, x.shape[-1], self.features))
    y = jax.lax.conv_general_dilated(
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
    )
    if bias is not None:
      y += bias.reshape((1,) * (y.ndim - 1) + bias.shape)
    return y


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
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  policy: QuantPolicy | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = quantized_operands(self, x, (x.shape[-1], self.features))
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
      y += bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y
