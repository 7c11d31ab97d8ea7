"""The policy table: every Conv/Dense of a model with its kernel shape and treatment."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from binarydm_jax.quant.binarize import with_policy
from binarydm_jax.quant.layers import QuantConv, QuantDense
from binarydm_jax.quant.policy import (
  FULL_PRECISION_POLICY,
  LayerRow,
  LayerShape,
  QuantPolicy,
  format_policy_table,
  path_str,
)

_LAYER_TYPES = (QuantConv, QuantDense, nn.Conv, nn.Dense)


def layer_shapes(model: nn.Module, image_shape: Sequence[int]) -> tuple[LayerShape, ...]:
  """(path, kernel shape) of every Conv/Dense of `model`, in call order; via jax.eval_shape.

  Args:
    model: the UNet (built without a policy here; paths and shapes do not depend on it).
    image_shape: (H, W, C) of the input.
  """
  fp_model = with_policy(model, None)
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, _LAYER_TYPES):
      order.append(path_str(context.module.path))
    return next_fun(*args, **kwargs)

  def init(x, t):
    with nn.intercept_methods(record):
      return fp_model.init(jax.random.key(0), x, t)["params"]

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(init, x, jax.ShapeDtypeStruct((1,), jnp.int32))
  out = []
  for path in dict.fromkeys(order):
    tree = shapes
    for part in path.split("/"):
      tree = tree[part]
    out.append((path, tuple(tree["kernel"].shape)))
  return tuple(out)


def concatenated_inputs(model: nn.Module, image_shape: Sequence[int]) -> set[str]:
  """Paths of the layers whose input concatenates two tensors (the decoder's skip 1x1 convs)."""
  split: set[str] = set()

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and getattr(context.module, "input_split", None):
      split.add(path_str(context.module.path))
    return next_fun(*args, **kwargs)

  def init(x, t):
    with nn.intercept_methods(record):
      return with_policy(model, FULL_PRECISION_POLICY).init(jax.random.key(0), x, t)["params"]

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  jax.eval_shape(init, x, jax.ShapeDtypeStruct((1,), jnp.int32))
  return split


def layer_rows(policy: QuantPolicy, model: nn.Module, image_shape: Sequence[int]) -> list[LayerRow]:
  """(path, kernel shape, treatment) of every Conv/Dense of `model` under `policy`, in call order."""
  return [(path, shape, policy.resolve(path)) for path, shape in layer_shapes(model, image_shape)]


def policy_table(policy: QuantPolicy, model: nn.Module, image_shape: Sequence[int]) -> str:
  """A markdown table of every layer of `model` under `policy`, with a summary line.

  Args:
    policy: the quantization policy.
    model: the UNet.
    image_shape: (H, W, C) of the input.

  Returns:
    Columns: layer path, kernel shape, treatment, bases, act bits; then counts per treatment.
  """
  return format_policy_table(layer_rows(policy, model, image_shape))
