"""Import the UNet of a CompVis latent-diffusion checkpoint (openaimodel `UNetModel`) into our UNet.

The CompVis UNet numbers its blocks as ours does, with its own sub-module names:

* `time_embed.0` / `time_embed.2`: the two timestep-embedding linears;
* `input_blocks.0.0`: the stem conv; `input_blocks.{i}.0` a ResBlock and `input_blocks.{i}.1` its
  attention, or `input_blocks.{i}.0.op` a downsampling conv (a ResBlock with `resblock_updown`);
* `middle_block.0/1/2`: ResBlock, attention, ResBlock;
* `output_blocks.{i}.0` a ResBlock, `.1` its attention, and in the last block of a level its
  upsampling: a conv `.{1|2}.conv` or, with `resblock_updown`, a ResBlock `.{1|2}`;
* `out.0` / `out.2`: the final GroupNorm and conv.

A ResBlock holds `in_layers.0` (GroupNorm), `in_layers.2` (conv), `emb_layers.1` (linear),
`out_layers.0` (GroupNorm), `out_layers.3` (conv) and `skip_connection` (1x1 conv) where its width
changes. An attention block holds `norm`, the fused `qkv` and `proj_out`, both 1-d convs of kernel
size 1 (out, in, 1); `qkv` has the legacy layout (heads split before q, k, v) that
`diffusers_unet.split_legacy_qkv` separates with the config's head count.

The names and shapes the config implies are compared with the checkpoint's first: a checkpoint of
another model than the config names fails with one message listing the tensors that differ.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import ml_collections
import numpy as np

from binarydm_jax.convert.diffusers_unet import (
  LEAF_NAMES,
  ConversionError,
  add_names,
  convert_tensors,
  split_legacy_qkv,
)
from binarydm_jax.models.unet import attention_heads, config_param_shapes

PREFIX = "model.diffusion_model."  # Where an LDM checkpoint keeps its UNet.
LISTED = 6  # Names shown per kind of difference; the rest are counted.

# Sub-modules of our ResBlock -> their openaimodel names.
RESNET_NAMES = {
  ("norm_1", "norm"): "in_layers.0",
  ("conv_1",): "in_layers.2",
  ("temb_proj",): "emb_layers.1",
  ("norm_2", "norm"): "out_layers.0",
  ("conv_2",): "out_layers.3",
  ("skip",): "skip_connection",
}
# Sub-modules of our AttnBlock -> their openaimodel names; q, k and v are the three parts of the
# fused `qkv`, which `_separate_qkv` splits into these (the checkpoint itself has no such names).
ATTN_NAMES = {
  ("norm", "norm"): "norm",
  ("q",): "q",
  ("k",): "k",
  ("v",): "v",
  ("proj_out",): "proj_out",
}


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How a config's UNet is named in a CompVis checkpoint.

  Attributes:
    table: our module path -> the CompVis module name.
    attention: the CompVis name of each attention block -> its head count.
  """

  table: dict[tuple[str, ...], str]
  attention: dict[str, int]


def _layout(model_config: ml_collections.ConfigDict) -> _Layout:
  """The CompVis names of the UNet `model_config` builds (at `model_config.image_size`)."""
  table: dict[tuple[str, ...], str] = {
    ("time_embed_0",): "time_embed.0",
    ("time_embed_1",): "time_embed.2",
    ("conv_in",): "input_blocks.0.0",
    ("norm_out", "norm"): "out.0",
    ("conv_out",): "out.2",
  }
  attention: dict[str, int] = {}
  mults = list(model_config.ch_mult)
  updown = model_config.get("resblock_updown", False)

  def heads(level: int) -> int:
    return attention_heads(
      model_config.ch * mults[level],
      model_config.get("num_head_channels", -1),
      model_config.get("num_heads", -1),
    )

  def has_attn(level: int) -> bool:
    return model_config.image_size // 2**level in model_config.attn_resolutions

  add = functools.partial(add_names, table)

  def add_block(ours: str, theirs: str, level: int) -> None:
    """A ResBlock `{theirs}.0` and, at an attention resolution, its attention `{theirs}.1`."""
    add((ours, "res"), f"{theirs}.0", RESNET_NAMES)
    if has_attn(level):
      add((ours, "attn"), f"{theirs}.1", ATTN_NAMES)
      attention[f"{theirs}.1"] = heads(level)

  block = 1
  for level in range(len(mults)):
    for _ in range(model_config.num_res_blocks):
      add_block(f"input_blocks_{block}", f"input_blocks.{block}", level)
      block += 1
    if level != len(mults) - 1:
      if updown:
        add((f"input_blocks_{block}",), f"input_blocks.{block}.0", RESNET_NAMES)
      else:
        table[(f"input_blocks_{block}",)] = f"input_blocks.{block}.0.op"
      block += 1
  add(("middle_res_0",), "middle_block.0", RESNET_NAMES)
  add(("middle_attn",), "middle_block.1", ATTN_NAMES)
  add(("middle_res_1",), "middle_block.2", RESNET_NAMES)
  attention["middle_block.1"] = heads(len(mults) - 1)
  block = 0
  for level in reversed(range(len(mults))):
    for i in range(model_config.num_res_blocks + 1):
      add_block(f"output_blocks_{block}", f"output_blocks.{block}", level)
      if level != 0 and i == model_config.num_res_blocks:
        upsample = f"output_blocks.{block}.{2 if has_attn(level) else 1}"
        if updown:
          add((f"output_blocks_{block}", "upsample"), upsample, RESNET_NAMES)
        else:
          table[(f"output_blocks_{block}", "upsample")] = f"{upsample}.conv"
      block += 1
  return _Layout(table, attention)


def _torch_shape(shape: Sequence[int], leaf: str) -> tuple[int, ...]:
  """The torch shape of one of our params: the inverse of `diffusers_unet.to_flax`'s layout."""
  if leaf == "kernel" and len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:  # Dense (in, out) -> Linear (out, in)
    return (shape[1], shape[0])
  return tuple(shape)


def state_dict_shapes(model_config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """The tensor names (without `model.diffusion_model.`) and torch shapes of the CompVis UNet
  that `model_config` describes, attention in its fused 1-d conv form.

  Args:
    model_config: our `config.model` section, with `image_size` (the latents' side).

  Returns:
    name -> shape, e.g. `input_blocks.1.1.qkv.weight` -> (3C, C, 1).
  """
  layout = _layout(model_config)
  shapes = {}
  for path, spec in flax.traverse_util.flatten_dict(config_param_shapes(model_config)).items():
    module, leaf = path[:-1], path[-1]
    shapes[f"{layout.table[module]}.{LEAF_NAMES[leaf]}"] = _torch_shape(spec.shape, leaf)
  for attn in layout.attention:
    for leaf, conv1d in (("weight", (1,)), ("bias", ())):
      q, k, v = (shapes.pop(f"{attn}.{part}.{leaf}") for part in "qkv")
      shapes[f"{attn}.qkv.{leaf}"] = (q[0] + k[0] + v[0], *q[1:], *conv1d)
    shapes[f"{attn}.proj_out.weight"] += (1,)
  return shapes


def _natural(name: str) -> list[Any]:
  """Sort key that puts `input_blocks.2` before `input_blocks.10`."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _listing(items: Sequence[str]) -> str:
  shown = ", ".join(items[:LISTED])
  return shown + (f", ... ({len(items) - LISTED} more)" if len(items) > LISTED else "")


def _describe(model_config: ml_collections.ConfigDict) -> str:
  fields = ("channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "image_size")
  options = ("use_scale_shift_norm", "resblock_updown")
  values = {f: model_config[f] for f in fields} | {o: model_config.get(o, False) for o in options}
  return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in values.items())


def check_shapes(
  state_dict: Mapping[str, Any], model_config: ml_collections.ConfigDict, prefix: str = PREFIX
) -> None:
  """Checks that the UNet tensors of `state_dict` are those of the UNet `model_config` describes.

  Args:
    state_dict: the UNet's tensors, named without `prefix` (anything with a `.shape`).
    model_config: our `config.model` section, with `image_size`.
    prefix: shown before the names in the error.

  Raises:
    ConversionError: one line naming the tensors of other shapes, the missing and the unexpected
      ones (a few of each, and how many there are), i.e. a checkpoint of another model.
  """
  expected = state_dict_shapes(model_config)
  found = {name: tuple(value.shape) for name, value in state_dict.items()}
  differ = sorted(
    (n for n in expected.keys() & found.keys() if expected[n] != found[n]), key=_natural
  )
  missing = sorted(expected.keys() - found.keys(), key=_natural)
  unexpected = sorted(found.keys() - expected.keys(), key=_natural)
  problems = []
  if differ:
    shapes = [f"{prefix}{n} {found[n]} (config: {expected[n]})" for n in differ]
    problems.append(f"{len(differ)} of other shapes: {_listing(shapes)}")
  if missing:
    problems.append(f"{len(missing)} missing: {_listing([prefix + n for n in missing])}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected: {_listing([prefix + n for n in unexpected])}")
  if problems:
    raise ConversionError(
      f"the checkpoint's UNet ({prefix}*, {len(found)} tensors) is not the one config.model "
      f"describes ({_describe(model_config)}, {len(expected)} tensors); it is a checkpoint of "
      "another model than the config names: " + "; ".join(problems)
    )


def _separate_qkv(
  state_dict: Mapping[str, Any], attention: Mapping[str, int]
) -> dict[str, np.ndarray]:
  """Splits each fused `qkv` into q, k, v (torch Linear layout) and drops the 1-d convs' last axis."""
  out = dict(state_dict)
  for attn, heads in attention.items():
    for leaf in ("weight", "bias"):
      qkv = np.asarray(out.pop(f"{attn}.qkv.{leaf}"))
      parts = split_legacy_qkv(qkv[..., 0] if leaf == "weight" else qkv, heads)
      out.update({f"{attn}.{name}.{leaf}": part for name, part in zip("qkv", parts, strict=True)})
    out[f"{attn}.proj_out.weight"] = np.asarray(out[f"{attn}.proj_out.weight"])[..., 0]
  return out


def convert_state_dict(
  state_dict: Mapping[str, Any], model_config: ml_collections.ConfigDict, prefix: str = PREFIX
) -> dict[str, Any]:
  """Converts the CompVis UNet tensors of an LDM state dict to our UNet's `params` collection.

  Args:
    state_dict: tensor name -> array (numpy or torch); only the names under `prefix` are read.
    model_config: our `config.model` section of the same architecture, with `image_size`.
    prefix: `model.diffusion_model.` in an LDM checkpoint.

  Returns:
    The nested `params` tree (float32 numpy arrays): `unet.apply({"params": params}, x, t)`.

  Raises:
    ConversionError: when no tensor has `prefix`, or (one line) listing the tensors that differ
      from those of the config's UNet.
  """
  ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not ours:
    raise ConversionError(
      f"the checkpoint has no UNet weights (no tensor named {prefix}*): pass the model.ckpt of "
      "a CompVis latent diffusion model"
    )
  check_shapes(ours, model_config, prefix)
  layout = _layout(model_config)
  params, problems = convert_tensors(
    _separate_qkv(ours, layout.attention), layout.table, config_param_shapes(model_config)
  )
  if problems:
    raise ConversionError(f"CompVis UNet ({prefix}*) did not convert: " + "; ".join(problems))
  return params
