"""A quantized layer's input grids: step/offset tables, their calibration, the grid of each sample.

A layer's input x (samples first, channels last) is quantized part by part: one part, or with
`act_split` the two parts of a concatenated input (`[h, skip]` in the decoder; the layer knows the
split from its `input_split` field). Each part uses the step (and, for LSQ+, the offset) of the
sample's timestep group: with `act_t_groups` = K the timesteps 0..T-1 fall into K equal ranges.
Params: `act_step` (and `act_offset`) of shape () for one group and one part, else (K, P). The
'dynamic' quantizer has no params: its step is computed from each sample (`lsq.dynamic_step`).

The timesteps reach the layers through `timestep_scope(t)`, which the UNet opens around its body
(a layer's call signature stays x -> y, as for nn.Conv/nn.Dense). Only layers with K > 1 read it.

`bias_correction`: the mean shift E[y(q(x)) - y(x)] of each output channel (per timestep group) is
measured at calibration, stored as `bias_correction` ((C,) or (K, C)) and subtracted from the
output: the correction for the expected quantization error of DFQ and PTQD.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from binarydm_jax.quant import lsq
from binarydm_jax.quant.policy import LayerQuant

CALIB_COLLECTION = "quant_calib"
# Per-sample quantization error of every quantized input, sown when this collection is mutable:
# `signal` = sum x^2 and `noise` = sum (x - q(x))^2 over each sample's elements.
ERROR_COLLECTION = "quant_error"

_TIMESTEPS: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
  "binarydm_jax_quant_timesteps", default=None
)


@contextlib.contextmanager
def timestep_scope(t: jax.Array) -> Iterator[None]:
  """Makes the timesteps `t` (one per sample) visible to the quantized layers called inside."""
  token = _TIMESTEPS.set(t)
  try:
    yield
  finally:
    _TIMESTEPS.reset(token)


def timestep_groups(t: jax.Array, groups: int, num_timesteps: int) -> jax.Array:
  """The group index floor(t * K / T) in 0..K-1 of each timestep."""
  return jnp.clip(t.astype(jnp.int32) * groups // num_timesteps, 0, groups - 1)


@dataclasses.dataclass(frozen=True)
class Grid:
  """The quantization grid of one part of a layer input.

  Attributes:
    part: the channels (last axis) of the input that this grid quantizes.
    step: the step, () or per sample (B, 1, ..., 1).
    offset: the LSQ+ offset shaped like `step`, or None for a signed grid.
  """

  part: slice
  step: jax.Array
  offset: jax.Array | None


def is_calibrating(module: nn.Module) -> bool:
  """Whether `module` runs the calibration pass (the calibration collection is mutable)."""
  return module.is_mutable_collection(CALIB_COLLECTION) and not module.is_initializing()


def parts(channels: int, spec: LayerQuant, input_split: int | None) -> list[slice]:
  """The channel ranges quantized separately: two with `act_split` (split at `input_split`)."""
  if not spec.act_split:
    return [slice(0, channels)]
  if input_split is None or not 0 < input_split < channels:
    raise ValueError(
      f"act_split needs a concatenated input; this layer's input_split is {input_split!r}"
    )
  return [slice(0, input_split), slice(input_split, channels)]


def sample_groups(module: nn.Module, spec: LayerQuant, batch: int) -> jax.Array | None:
  """The timestep group of each sample, or None with one group."""
  if spec.act_t_groups == 1:
    return None
  t = _TIMESTEPS.get()
  if t is None:
    raise ValueError(
      f"layer {'/'.join(module.path)}: act_t_groups={spec.act_t_groups} needs the timesteps; "
      "call it inside quant.timestep_scope(t) (the UNet does)"
    )
  if t.shape != (batch,):
    raise ValueError(f"timestep_scope holds t of shape {t.shape}; the input has {batch} samples")
  return timestep_groups(t, spec.act_t_groups, module.policy.num_timesteps)


def group_weights(groups: jax.Array, count: int) -> jax.Array:
  """(K, B): row k weighs the samples of group k; all samples where a group has none."""
  masks = (groups[None, :] == jnp.arange(count)[:, None]).astype(jnp.float32)
  return jnp.where(jnp.sum(masks, axis=1, keepdims=True) > 0, masks, 1.0)


def _table_shape(spec: LayerQuant, num_parts: int) -> tuple[int, ...]:
  return () if spec.act_t_groups == 1 and num_parts == 1 else (spec.act_t_groups, num_parts)


def _fit(x: jax.Array, spec: LayerQuant, weights: jax.Array | None) -> tuple[jax.Array, ...]:
  if spec.act_quantizer == lsq.ASYMMETRIC:
    return lsq.fit_asymmetric(x, spec.act_bits, spec.act_init, weights)
  return (lsq.fit_signed(x, spec.act_bits, spec.act_init, weights),)


def _fit_tables(
  x: jax.Array, slices: list[slice], spec: LayerQuant, groups: jax.Array | None
) -> tuple[jax.Array, ...]:
  """(step table, [offset table]) fitted on `x`: per group (rows) and part (columns)."""
  if groups is None:  # One group: the fit of all samples, (1, P).
    columns = [[value[None] for value in _fit(x[..., part], spec, None)] for part in slices]
  else:  # One vectorised fit per part over the groups' weights, (K, P).
    weights = group_weights(groups, spec.act_t_groups)
    columns = [jax.vmap(lambda w, p=part: _fit(x[..., p], spec, w))(weights) for part in slices]
  shape = _table_shape(spec, len(slices))
  return tuple(
    jnp.stack([column[i] for column in columns], axis=1).reshape(shape)
    for i in range(len(columns[0]))
  )


def _placeholder(x: jax.Array, slices: list[slice], spec: LayerQuant) -> tuple[jax.Array, ...]:
  """The init values of the tables: the 'lsq' fit of the init batch, in every cell."""
  lsq_spec = dataclasses.replace(spec, act_init=lsq.LSQ_INIT)
  fitted = [_fit(x[..., part], lsq_spec, None) for part in slices]
  shape = _table_shape(spec, len(slices))
  return tuple(
    jnp.broadcast_to(jnp.stack([cell[i] for cell in fitted]), shape) if shape else fitted[0][i]
    for i in range(len(fitted[0]))
  )


def _per_sample(table: jax.Array, groups: jax.Array | None, index: int, ndim: int) -> jax.Array:
  """Part `index`'s value of `table` for each sample: () or (B, 1, ..., 1)."""
  if table.ndim == 0:
    return table
  column = table[:, index]
  if groups is None:
    return column[0]
  return column[groups].reshape((-1,) + (1,) * (ndim - 1))


def grids(module: nn.Module, x: jax.Array, spec: LayerQuant, input_split: int | None) -> list[Grid]:
  """The grid of each part of `module`'s input `x`; creates (and when calibrating, fits) the params.

  Calibration stores the fitted tables in the `quant_calib` collection (`binarize.calibrate`
  copies them into `params`).
  """
  slices = parts(x.shape[-1], spec, input_split)
  if spec.act_quantizer == lsq.DYNAMIC:
    return [Grid(part, lsq.dynamic_step(x[..., part], spec.act_bits), None) for part in slices]
  groups = sample_groups(module, spec, x.shape[0])
  names = ("act_step", "act_offset")[: 2 if spec.act_quantizer == lsq.ASYMMETRIC else 1]
  tables = [
    module.param(name, lambda _, i=i: _placeholder(x, slices, spec)[i])
    for i, name in enumerate(names)
  ]
  if is_calibrating(module):
    tables = list(_fit_tables(x, slices, spec, groups))
    for name, table in zip(names, tables, strict=True):
      module.put_variable(CALIB_COLLECTION, name, table)
  step_table, offset_table = (tables + [None])[:2]
  return [
    Grid(
      part,
      _per_sample(step_table, groups, i, x.ndim),
      None if offset_table is None else _per_sample(offset_table, groups, i, x.ndim),
    )
    for i, part in enumerate(slices)
  ]


def fake_quantize(x: jax.Array, part_grids: list[Grid], bits: int) -> jax.Array:
  """x quantized part by part on its grids (LSQ or LSQ+ with the STE), in float32."""
  out = []
  for grid in part_grids:
    x_part = x[..., grid.part]
    if grid.offset is None:
      out.append(lsq.lsq_quantize(x_part, grid.step, bits))
    else:
      out.append(lsq.lsq_plus_quantize(x_part, grid.step, grid.offset, bits))
  return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)


def record_error(module: nn.Module, x: jax.Array, x_q: jax.Array) -> None:
  """Sows each sample's sum x^2 and sum (x - q(x))^2 when the error collection is mutable."""
  if not module.is_mutable_collection(ERROR_COLLECTION):
    return
  axes = tuple(range(1, x.ndim))
  x = x.astype(jnp.float32)
  module.sow(ERROR_COLLECTION, "signal", jnp.sum(x**2, axis=axes))
  module.sow(ERROR_COLLECTION, "noise", jnp.sum((x - x_q.astype(jnp.float32)) ** 2, axis=axes))


def correct_bias(
  module: nn.Module,
  y: jax.Array,
  spec: LayerQuant,
  reference: Callable[[], jax.Array] | None,
) -> jax.Array:
  """`y` less the layer's `bias_correction` (per channel, per timestep group) when the spec asks.

  When calibrating, the correction is measured first: the mean over each group's samples and
  all positions of y - reference(), where `reference()` is the layer's output on its unquantized
  input (None on the integer path, which is never calibrated).
  """
  if not spec.bias_correction:
    return y
  channels = y.shape[-1]
  shape = (channels,) if spec.act_t_groups == 1 else (spec.act_t_groups, channels)
  correction = module.param("bias_correction", nn.initializers.zeros_init(), shape, jnp.float32)
  groups = sample_groups(module, spec, y.shape[0])
  if is_calibrating(module):
    if reference is None:
      raise ValueError("bias_correction is calibrated on the float path (inference='float')")
    diff = (y.astype(jnp.float32) - reference().astype(jnp.float32)).reshape(
      y.shape[0], -1, channels
    )
    per_sample = jnp.mean(diff, axis=1)
    if groups is None:
      correction = jnp.mean(per_sample, axis=0)
    else:
      weights = group_weights(groups, spec.act_t_groups)
      correction = weights @ per_sample / jnp.sum(weights, axis=1, keepdims=True)
    module.put_variable(CALIB_COLLECTION, "bias_correction", correction)
  if groups is None:
    per_sample = correction
  else:
    per_sample = correction[groups].reshape((y.shape[0],) + (1,) * (y.ndim - 2) + (channels,))
  return (y - per_sample.astype(y.dtype)).astype(y.dtype)
