"""Labels for every param leaf, for `optax.partition` (alias `optax.multi_transform`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

PARAM_GROUPS = ("kernel", "scale_first", "scale_higher", "act_quant", "other")
_SCALE = re.compile(r"scale_(\d+)")


def param_group(path: Sequence[Any]) -> str:
  """The group of the param leaf at `path` (e.g. ('input_blocks_1', 'res', 'conv_1', 'scale_2')).

  Args:
    path: dict keys from the root; jax key-path entries (DictKey) are accepted too.

  Returns:
    'kernel' (latent weights), 'scale_first' (sigma_1), 'scale_higher' (sigma_2, sigma_3, ...:
    what the EBB regulariser drives to zero), 'act_quant' (act_step, act_offset, bias_correction) or 'other'
    (biases, GroupNorm scale/bias).
  """
  name = _key(path[-1])
  if name == "kernel":
    return "kernel"
  index = scale_index(name)
  if index is not None:
    return "scale_first" if index == 1 else "scale_higher"
  if name in ("act_step", "act_offset", "bias_correction"):
    return "act_quant"
  return "other"


def scale_index(name: str) -> int | None:
  """i for a binary-scale leaf named `scale_i`, else None (GroupNorm's `scale` is not one)."""
  match = _SCALE.fullmatch(name)
  return int(match.group(1)) if match else None


def _key(entry: Any) -> str:
  return str(getattr(entry, "key", entry))


def param_labels(params: Any) -> Any:
  """A tree like `params` with each leaf replaced by its `param_group` label."""
  return jax.tree.map_with_path(lambda path, _: param_group(tuple(map(_key, path))), params)
