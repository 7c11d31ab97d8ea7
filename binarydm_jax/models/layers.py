"""Building blocks shared by the UNet: the layer factory and the timestep embedding.

Every Conv and Dense of the UNet is created by `LayerFactory`, the one place where a quantization
policy can swap full-precision layers for binarized ones while keeping `kernel`/`bias` param names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from binarydm_jax.quant import int8
from binarydm_jax.quant.layers import QuantConv, QuantDense
from binarydm_jax.quant.policy import QuantPolicy

# DDPM initialises with variance scaling over (fan_in + fan_out), uniform.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

Padding = str | tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class LayerFactory:
  """Creates the UNet's Conv/Dense layers, so the layer type is decided in one place.

  Attributes:
    dtype: compute dtype of every layer (params stay float32).
    policy: quantization policy; None builds plain nn.Conv/nn.Dense. With a policy every layer is
      a QuantConv/QuantDense (same `kernel`/`bias` params) that resolves its own treatment from
      its module path.
    inference: 'float' (fake quantization) or 'int8' (single-basis binary layers with quantized
      inputs on int8 operands with int32 accumulation; see `quant/int8.py`). Needs a policy.
  """

  dtype: Any = jnp.float32
  policy: QuantPolicy | None = None
  inference: str = int8.FLOAT

  def __post_init__(self):
    int8.check_inference(self.inference)
    if self.policy is None and self.inference != int8.FLOAT:
      raise ValueError(
        f"inference={self.inference!r} needs a quantization policy; pass one to with_policy"
      )

  def conv(
    self,
    features: int,
    kernel_size: tuple[int, int] = (3, 3),
    strides: tuple[int, int] = (1, 1),
    padding: Padding = ((1, 1), (1, 1)),
    zero_init: bool = False,
    name: str | None = None,
    input_split: int | None = None,
  ) -> nn.Module:
    """A 2-D convolution on NHWC inputs with `kernel` (HWIO) and `bias` params.

    `input_split`: the input concatenates two tensors, the first with this many channels (a
    quantization policy may quantize the parts separately: `act_split`).
    """
    kernel_init = nn.initializers.zeros if zero_init else default_kernel_init
    if self.policy is not None:
      return QuantConv(
        features,
        tuple(kernel_size),
        strides=tuple(strides),
        padding=padding,
        dtype=self.dtype,
        kernel_init=kernel_init,
        policy=self.policy,
        inference=self.inference,
        input_split=input_split,
        name=name,
      )
    return nn.Conv(
      features,
      kernel_size,
      strides=strides,
      padding=padding,
      dtype=self.dtype,
      kernel_init=kernel_init,
      name=name,
    )

  def dense(self, features: int, zero_init: bool = False, name: str | None = None) -> nn.Module:
    """A dense layer over the last axis with `kernel` (in, out) and `bias` params."""
    kernel_init = nn.initializers.zeros if zero_init else default_kernel_init
    if self.policy is not None:
      return QuantDense(
        features,
        dtype=self.dtype,
        kernel_init=kernel_init,
        policy=self.policy,
        inference=self.inference,
        name=name,
      )
    return nn.Dense(features, dtype=self.dtype, kernel_init=kernel_init, name=name)


def timestep_embedding(
  timesteps: jnp.ndarray,
  dim: int,
  freq_shift: float = 1.0,
  flip_sin_to_cos: bool = False,
  max_period: float = 10000.0,
) -> jnp.ndarray:
  """Sinusoidal timestep embedding of Ho et al. (2020), shape (batch, dim).

  Frequencies are exp(-log(max_period) * i / (dim/2 - freq_shift)). DDPM uses freq_shift=1 with
  [sin, cos]; LDM/openaimodel uses freq_shift=0 with [cos, sin] (flip_sin_to_cos=True).
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb
