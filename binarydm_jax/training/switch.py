"""The EBB switch from two bases to one (stage 1 -> 2): the optional handover and its report.

At `qat.switch_step` the higher-order scales sigma_II, ... are removed (`qat_optim`: the update of
that step is -params). What the removal costs is measured here, once, on the calibration batches:
the relative change of every UNet block's output between the two-basis student and the
single-basis one it becomes. `qat.switch_handover='refit'` (beyond the paper) first re-fits each
channel's sigma_I to its two-basis kernel (least squares) and recalibrates every activation step,
so that the collapsed model moves as little as a closed-form rescale allows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from binarydm_jax.quant import binarize_kernel, calibrate, sign
from binarydm_jax.quant.params import scale_index
from binarydm_jax.training import lrm

HANDOVERS = ("none", "refit")
Params = Mapping[str, Any]


def _binary_layers(params: Params, path: str = "") -> Iterator[tuple[str, Params]]:
  """(path, layer dict) of every binarized layer: a dict holding `kernel` and `scale_1`."""
  if "kernel" in params and "scale_1" in params:
    yield path, params
    return
  for name, value in params.items():
    if isinstance(value, Mapping):
      yield from _binary_layers(value, f"{path}{name}/")


def _scales(layer: Params) -> list[jax.Array]:
  """sigma_1, sigma_2, ... of a binarized layer, in basis order."""
  names = sorted((n for n in layer if scale_index(n) is not None), key=scale_index)
  return [layer[n] for n in names]


def _replace_layers(params: Params, new_layer, path: str = "") -> dict[str, Any]:
  """`params` with every binarized layer dict passed through `new_layer(path, layer)`."""
  if "kernel" in params and "scale_1" in params:
    return new_layer(path, params)
  return {
    name: _replace_layers(value, new_layer, f"{path}{name}/")
    if isinstance(value, Mapping)
    else value
    for name, value in params.items()
  }


def higher_to_first_ratio(params: Params) -> float:
  """Mean over two-basis layers of mean|sigma_II| / mean|sigma_I|: how much the switch cuts off."""
  ratios = [
    jnp.mean(jnp.abs(s[1])) / jnp.mean(jnp.abs(s[0]))
    for s in (_scales(layer) for _, layer in _binary_layers(params))
    if len(s) > 1
  ]
  return float(jnp.mean(jnp.stack(ratios))) if ratios else 0.0


def _drop_higher(layer: Params) -> dict[str, Any]:
  """A binarized layer dict with sigma_II, sigma_III, ... set to exactly 0."""
  return {n: jnp.zeros_like(v) if (scale_index(n) or 0) > 1 else v for n, v in layer.items()}


def collapse(params: Params) -> dict[str, Any]:
  """The single-basis student: every sigma_II, sigma_III, ... set to exactly 0."""
  return _replace_layers(params, lambda _, layer: _drop_higher(layer))


def refit_first_scales(params: Params) -> dict[str, Any]:
  """sigma_I := the per-channel least-squares scale of the two-basis kernel onto sign(W).

  argmin_a ||K2 - a sign(W)||^2 = mean(K2 * sign(W)) over a channel's weights, with K2 the
  layer's effective multi-basis kernel; higher scales are then 0. One-basis layers are unchanged.
  """

  def refit(_, layer):
    scales = _scales(layer)
    if len(scales) == 1:
      return dict(layer)
    kernel = jnp.asarray(layer["kernel"], jnp.float32)
    effective = binarize_kernel(kernel, scales)
    axes = tuple(range(kernel.ndim - 1))
    first = jnp.mean(effective * sign(kernel), axis=axes).astype(layer["scale_1"].dtype)
    return {**_drop_higher(layer), "scale_1": first}

  return _replace_layers(params, refit)


def handover(
  student: nn.Module, params: Params, batches: Sequence[tuple[jax.Array, jax.Array]], kind: str
) -> dict[str, Any]:
  """The single-basis params the student continues from after the switch.

  'none': sigma_II dropped (the paper). 'refit': `refit_first_scales`, then every activation step
  recalibrated on the first calibration batch (each layer's input moves once the head changes).
  """
  if kind not in HANDOVERS:
    raise ValueError(f"config.qat.switch_handover={kind!r}: expected one of {HANDOVERS}")
  if kind == "none":
    return collapse(params)
  x_t, t = batches[0]
  return calibrate(student, refit_first_scales(params), x_t, t)


def block_change(
  student: nn.Module, before: Params, after: Params, batches: Sequence[tuple[jax.Array, jax.Array]]
) -> dict[str, float]:
  """||f_after - f_before|| / ||f_before|| of every block output (and the eps output) over `batches`."""

  @jax.jit
  def outputs(params, x_t, t):
    eps, variables = student.apply(
      {"params": params}, x_t, t, train=False, mutable=["intermediates"]
    )
    return {**lrm.block_features(variables["intermediates"]), "eps": eps}

  diff: dict[str, float] = {}
  norm: dict[str, float] = {}
  for x_t, t in batches:
    old, new = outputs(before, x_t, t), outputs(after, x_t, t)
    for name in old:
      diff[name] = diff.get(name, 0.0) + float(jnp.sum(jnp.square(new[name] - old[name])))
      norm[name] = norm.get(name, 0.0) + float(jnp.sum(jnp.square(old[name])))
  return {name: (diff[name] / max(norm[name], 1e-30)) ** 0.5 for name in diff}
