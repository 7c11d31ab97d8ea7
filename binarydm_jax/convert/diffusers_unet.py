"""Import a diffusers `UNet2DModel` checkpoint (e.g. `google/ddpm-cifar10-32`) into our Flax UNet.

A diffusers model directory holds `config.json` and `diffusion_pytorch_model.safetensors` (or the
torch pickle `diffusion_pytorch_model.bin`). The conversion has two halves:

* `model_config_from_diffusers`: the diffusers config becomes our `config.model` section. Every
  architectural field is either mapped onto a UNet option or rejected with an error that names it.
* `convert_state_dict`: the PyTorch tensors become our param tree. Conv kernels go OIHW -> HWIO,
  Linear weights (out, in) -> (in, out), GroupNorm `weight` -> `scale`. The mapping is driven by the
  param tree of the target UNet: each of our params takes exactly one source tensor, and any
  missing, left-over or wrongly shaped tensor makes the conversion fail with a list of names.

torch is not a dependency of the library: it is imported only to read `.bin` pickles.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from binarydm_jax.errors import TeacherError
from binarydm_jax.models.unet import config_param_shapes

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"

# google/ddpm-cifar10-32's config.json as published on the hub (DDPM's CIFAR-10 UNet).
DDPM_CIFAR10_CONFIG = {
  "_class_name": "UNet2DModel",
  "act_fn": "silu",
  "attention_head_dim": None,
  "block_out_channels": [128, 256, 256, 256],
  "center_input_sample": False,
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
  "downsample_padding": 0,
  "flip_sin_to_cos": False,
  "freq_shift": 1,
  "in_channels": 3,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-06,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 32,
  "time_embedding_type": "positional",
  "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}

# Defaults of `diffusers.UNet2DModel.__init__` (diffusers 0.42.1); `config.json` files may omit
# fields, and diffusers then uses these values. Note attention_head_dim=8 and norm_eps=1e-5 here,
# while google/ddpm-cifar10-32 sets null (one head) and 1e-6 explicitly.
DIFFUSERS_UNET2D_DEFAULTS: dict[str, Any] = {
  "sample_size": None,
  "in_channels": 3,
  "out_channels": 3,
  "center_input_sample": False,
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "freq_shift": 0,
  "flip_sin_to_cos": True,
  "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
  "mid_block_type": "UNetMidBlock2D",
  "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  "block_out_channels": (224, 448, 672, 896),
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "downsample_padding": 1,
  "downsample_type": "conv",
  "upsample_type": "conv",
  "dropout": 0.0,
  "act_fn": "silu",
  "attention_head_dim": 8,
  "norm_num_groups": 32,
  "attn_norm_num_groups": None,
  "norm_eps": 1e-5,
  "resnet_time_scale_shift": "default",
  "add_attention": True,
  "class_embed_type": None,
  "num_class_embeds": None,
  "num_train_timesteps": None,
}

# Block type -> (has attention, how it resamples: a fixed kind, or None for the config's
# downsample_type / upsample_type).
_DOWN_TYPES = {
  "DownBlock2D": (False, "conv"),
  "ResnetDownsampleBlock2D": (False, "resnet"),
  "AttnDownBlock2D": (True, None),
}
_UP_TYPES = {
  "UpBlock2D": (False, "conv"),
  "ResnetUpsampleBlock2D": (False, "resnet"),
  "AttnUpBlock2D": (True, None),
}
_TIME_SCALE_SHIFT = {"default": False, "scale_shift": True}
_DOWNSAMPLE_PADDING = {0: "asymmetric", 1: "symmetric"}

# Sub-modules of our ResBlock / AttnBlock -> their diffusers names. Our GroupNorm wraps a flax
# `nn.GroupNorm` called "norm", hence the two-level keys.
RESNET_NAMES = {
  ("norm_1", "norm"): "norm1",
  ("conv_1",): "conv1",
  ("temb_proj",): "time_emb_proj",
  ("norm_2", "norm"): "norm2",
  ("conv_2",): "conv2",
  ("skip",): "conv_shortcut",
}
ATTN_NAMES = {
  ("norm", "norm"): "group_norm",
  ("q",): "to_q",
  ("k",): "to_k",
  ("v",): "to_v",
  ("proj_out",): "to_out.0",
}
# Attention projections of checkpoints saved before diffusers 0.14 (diffusers renames them on load).
_DEPRECATED_ATTN_NAMES = {
  "query": "to_q",
  "key": "to_k",
  "value": "to_v",
  "proj_attn": "to_out.0",
}
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


class ConversionError(TeacherError):
  """A diffusers checkpoint that cannot be converted (unsupported config, tensors that don't fit)."""


def _strip_unetres(block_type: str) -> str:
  # diffusers' get_down_block/get_up_block accept a legacy "UNetRes" prefix.
  return block_type[len("UNetRes") :] if block_type.startswith("UNetRes") else block_type


def model_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Maps a diffusers `UNet2DModel` config onto our `config.model` section.

  Args:
    diffusers_config: the content of a diffusers `config.json` (missing fields take diffusers'
      defaults, `_`-prefixed metadata is ignored).

  Returns:
    A ConfigDict with the fields `unet_from_config` reads (ch, ch_mult, num_res_blocks,
    attn_resolutions, channels, dropout, num_head_channels, norm_groups, norm_eps, freq_shift,
    flip_sin_to_cos, downsample_padding, use_scale_shift_norm, resblock_updown) plus
    `image_size`.

  Raises:
    ConversionError: naming every field whose value our UNet cannot reproduce.
  """
  class_name = diffusers_config.get("_class_name", "UNet2DModel")
  if class_name != "UNet2DModel":
    raise ConversionError(f"_class_name={class_name!r}: only diffusers UNet2DModel is supported")
  unknown = sorted(
    k for k in diffusers_config if not k.startswith("_") and k not in DIFFUSERS_UNET2D_DEFAULTS
  )
  if unknown:
    # diffusers itself ignores unexpected config keys (with a warning); so do we.
    logging.warning("Ignoring unknown diffusers UNet2DModel config fields: %s", unknown)
  cfg = {**DIFFUSERS_UNET2D_DEFAULTS, **diffusers_config}
  problems = []

  def require(field: str, ok: bool, expected: str) -> None:
    if not ok:
      problems.append(f"{field}={cfg[field]!r} (supported: {expected})")

  require("time_embedding_type", cfg["time_embedding_type"] == "positional", "'positional'")
  require("center_input_sample", not cfg["center_input_sample"], "false")
  require("mid_block_type", cfg["mid_block_type"] == "UNetMidBlock2D", "'UNetMidBlock2D'")
  require("mid_block_scale_factor", cfg["mid_block_scale_factor"] == 1, "1")
  require(
    "resnet_time_scale_shift",
    cfg["resnet_time_scale_shift"] in _TIME_SCALE_SHIFT,
    "'default' or 'scale_shift'",
  )
  require("act_fn", cfg["act_fn"] in ("silu", "swish"), "'silu' or 'swish'")
  require("add_attention", cfg["add_attention"] is True, "true")
  require("class_embed_type", cfg["class_embed_type"] is None, "null")
  require("num_class_embeds", cfg["num_class_embeds"] is None, "null")
  require("in_channels", cfg["in_channels"] == cfg["out_channels"], "equal to out_channels")
  require("downsample_padding", cfg["downsample_padding"] in _DOWNSAMPLE_PADDING, "0 or 1")
  require("norm_num_groups", isinstance(cfg["norm_num_groups"], int), "an integer")
  # diffusers' middle attention has a GroupNorm with attn_norm_num_groups groups, or if that is
  # null, with norm_num_groups groups under resnet_time_scale_shift='default' and none otherwise.
  require(
    "attn_norm_num_groups",
    cfg["attn_norm_num_groups"] == cfg["norm_num_groups"]
    or (cfg["attn_norm_num_groups"] is None and cfg["resnet_time_scale_shift"] == "default"),
    "equal to norm_num_groups; null only with resnet_time_scale_shift='default', as otherwise "
    "diffusers' middle attention has no GroupNorm",
  )

  channels = [int(c) for c in cfg["block_out_channels"]]
  ch = channels[0] if channels else 1
  require(
    "block_out_channels",
    len(channels) > 0 and all(c % ch == 0 for c in channels),
    "multiples of block_out_channels[0]",
  )
  require(
    "time_embedding_dim", cfg["time_embedding_dim"] in (None, 4 * ch), "null or 4*channels[0]"
  )
  down = [_strip_unetres(t) for t in cfg["down_block_types"]]
  up = [_strip_unetres(t) for t in cfg["up_block_types"]]
  require(
    "down_block_types",
    len(down) == len(channels) and all(t in _DOWN_TYPES for t in down),
    f"one of {sorted(_DOWN_TYPES)} per block_out_channels entry",
  )
  require(
    "up_block_types",
    len(up) == len(channels) and all(t in _UP_TYPES for t in up),
    f"one of {sorted(_UP_TYPES)} per block_out_channels entry",
  )
  attn_levels, resblock_updown = [], False
  if not problems:
    down_attn = [_DOWN_TYPES[t][0] for t in down]
    up_attn = [_UP_TYPES[t][0] for t in reversed(up)]
    require(
      "up_block_types",
      down_attn == up_attn,
      "attention at the same resolutions as down_block_types (mirrored)",
    )
    attn_levels = [level for level, attn in enumerate(down_attn) if attn]
    resblock_updown = _resblock_updown(cfg, down, up, problems)

  head_dim = cfg["attention_head_dim"]
  if head_dim is not None:
    attn_channels = [channels[level] for level in attn_levels] + [channels[-1]]
    require(
      "attention_head_dim",
      all(c % int(head_dim) == 0 for c in attn_channels),
      f"null or a divisor of every attention width {sorted(set(attn_channels))}",
    )

  size = cfg["sample_size"]
  if isinstance(size, (list, tuple)):
    require("sample_size", len(size) == 2 and size[0] == size[1], "square")
    size = size[0]
  require("sample_size", isinstance(size, int) and size > 0, "a positive integer")
  if not problems and size % 2 ** (len(channels) - 1):
    require("sample_size", False, f"divisible by {2 ** (len(channels) - 1)}")
  if problems:
    raise ConversionError(
      "diffusers UNet2DModel config not supported by binarydm_jax's UNet: " + "; ".join(problems)
    )

  return ml_collections.ConfigDict(
    {
      "image_size": size,
      "channels": int(cfg["out_channels"]),
      "ch": ch,
      "ch_mult": [c // ch for c in channels],
      "num_res_blocks": int(cfg["layers_per_block"]),
      "attn_resolutions": [size // 2**level for level in attn_levels],
      "dropout": float(cfg["dropout"]),
      "num_head_channels": -1 if head_dim is None else int(head_dim),
      "norm_groups": int(cfg["norm_num_groups"]),
      "norm_eps": float(cfg["norm_eps"]),
      "freq_shift": float(cfg["freq_shift"]),
      "flip_sin_to_cos": bool(cfg["flip_sin_to_cos"]),
      "downsample_padding": _DOWNSAMPLE_PADDING[cfg["downsample_padding"]],
      "use_scale_shift_norm": _TIME_SCALE_SHIFT[cfg["resnet_time_scale_shift"]],
      "resblock_updown": resblock_updown,
    }
  )


def _resblock_updown(
  cfg: Mapping[str, Any], down: list[str], up: list[str], problems: list[str]
) -> bool:
  """Whether every 2x resampling is a ResBlock (True) or a conv (False); mixes go to `problems`.

  Plain blocks resample by their type (DownBlock2D: conv, ResnetDownsampleBlock2D: ResBlock),
  Attn blocks by downsample_type / upsample_type; all but the last down / up block resample.
  """

  def kind(types: Mapping[str, tuple[bool, str | None]], block_type: str, field: str) -> str:
    fixed = types[block_type][1]
    return fixed or cfg[field] or "conv"

  kinds = {kind(_DOWN_TYPES, t, "downsample_type") for t in down[:-1]}
  kinds |= {kind(_UP_TYPES, t, "upsample_type") for t in up[:-1]}
  if kinds - {"conv"} and kinds != {"resnet"}:
    problems.append(
      f"downsample_type={cfg['downsample_type']!r}, upsample_type={cfg['upsample_type']!r} with "
      f"down_block_types={down}, up_block_types={up} resample by {sorted(kinds)} (supported: "
      "'conv' everywhere, or 'resnet' everywhere with ResnetDownsampleBlock2D / "
      "ResnetUpsampleBlock2D as the blocks without attention)"
    )
  return kinds == {"resnet"}


def add_names(
  table: dict[tuple[str, ...], str],
  ours: tuple[str, ...],
  theirs: str,
  names: Mapping[tuple[str, ...], str],
) -> None:
  """Adds `ours + sub -> theirs.name` to `table` for each sub-module of `names` (RESNET_NAMES...)."""
  for sub, name in names.items():
    table[ours + sub] = f"{theirs}.{name}"


def _module_table(model_config: ml_collections.ConfigDict) -> dict[tuple[str, ...], str]:
  """Our module paths -> diffusers module names, for every module the architecture may contain."""
  table: dict[tuple[str, ...], str] = {
    ("time_embed_0",): "time_embedding.linear_1",
    ("time_embed_1",): "time_embedding.linear_2",
    ("conv_in",): "conv_in",
    ("norm_out", "norm"): "conv_norm_out",
    ("conv_out",): "conv_out",
  }

  add = functools.partial(add_names, table)
  levels = len(model_config.ch_mult)
  n = model_config.num_res_blocks
  updown = model_config.get("resblock_updown", False)
  block = 1
  for level in range(levels):
    for j in range(n):
      add((f"input_blocks_{block}", "res"), f"down_blocks.{level}.resnets.{j}", RESNET_NAMES)
      add((f"input_blocks_{block}", "attn"), f"down_blocks.{level}.attentions.{j}", ATTN_NAMES)
      block += 1
    if level == levels - 1:
      continue
    if updown:
      add((f"input_blocks_{block}",), f"down_blocks.{level}.downsamplers.0", RESNET_NAMES)
    else:
      table[(f"input_blocks_{block}",)] = f"down_blocks.{level}.downsamplers.0.conv"
    block += 1
  add(("middle_res_0",), "mid_block.resnets.0", RESNET_NAMES)
  add(("middle_attn",), "mid_block.attentions.0", ATTN_NAMES)
  add(("middle_res_1",), "mid_block.resnets.1", RESNET_NAMES)
  block = 0
  for k in range(levels):
    for j in range(n + 1):
      add((f"output_blocks_{block}", "res"), f"up_blocks.{k}.resnets.{j}", RESNET_NAMES)
      add((f"output_blocks_{block}", "attn"), f"up_blocks.{k}.attentions.{j}", ATTN_NAMES)
      if updown:
        add((f"output_blocks_{block}", "upsample"), f"up_blocks.{k}.upsamplers.0", RESNET_NAMES)
      else:
        table[(f"output_blocks_{block}", "upsample")] = f"up_blocks.{k}.upsamplers.0.conv"
      block += 1
  return table


def _rename_deprecated_attention(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames pre-0.14 attention keys (`attentions.0.query.weight` -> `attentions.0.to_q.weight`)."""
  out = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    if len(parts) >= 3 and parts[-2] in _DEPRECATED_ATTN_NAMES and "attentions" in parts:
      new = ".".join(parts[:-2] + [_DEPRECATED_ATTN_NAMES[parts[-2]], parts[-1]])
      if new not in state_dict:
        key = new
    out[key] = value
  return out


def to_flax(value: Any, leaf: str) -> np.ndarray:
  """A torch tensor in our layout: Conv2d OIHW -> HWIO, Linear (out, in) -> (in, out), float32."""
  value = np.asarray(value, np.float32)
  if leaf == "kernel" and value.ndim == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if leaf == "kernel" and value.ndim == 2:  # Linear (out, in) -> Dense (in, out)
    return np.ascontiguousarray(value.T)
  return value


def split_legacy_qkv(qkv: Any, num_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Splits LDM's fused attention projection `qkv` into diffusers' to_q, to_k, to_v tensors.

  LDM (openaimodel `QKVAttentionLegacy`) projects C channels to 3C with one 1x1 conv and splits
  its output per head before q, k, v: output channel (h * 3 + j) * d + i, j = 0, 1, 2 for q, k, v,
  is channel h * d + i of projection j (d = C / num_heads). Our AttnBlock and diffusers use separate
  q, k, v projections whose outputs are (heads, d), so the two compute the same function and the
  conversion is this permutation of output channels (the softmax scale 1/sqrt(d) is the same).

  Args:
    qkv: the qkv conv's weight (3C, C, 1) or (3C, C), or its bias (3C,).
    num_heads: the attention layer's head count.

  Returns:
    (q, k, v), each with C leading channels and `qkv`'s other axes.

  Raises:
    ConversionError: if 3C is not a multiple of 3 * num_heads.
  """
  qkv = np.asarray(qkv)
  if num_heads < 1 or qkv.shape[0] % (3 * num_heads):
    raise ConversionError(
      f"qkv tensor of shape {qkv.shape}: its {qkv.shape[0]} output channels do not split into "
      f"q, k, v of {num_heads} heads; check the model's num_heads / num_head_channels"
    )
  rest = qkv.shape[1:]
  per_head = qkv.reshape(num_heads, 3, qkv.shape[0] // (3 * num_heads), *rest)
  q, k, v = (per_head[:, j].reshape(-1, *rest) for j in range(3))
  return q, k, v


def convert_tensors(
  state_dict: Mapping[str, Any],
  table: Mapping[tuple[str, ...], str],
  target: Any,
  leaf_names: Mapping[str, str] = LEAF_NAMES,
) -> tuple[dict[str, Any], list[str]]:
  """Fills the param tree `target` from `state_dict`, each tensor used at most once.

  Args:
    state_dict: tensor name -> array (numpy or anything `np.asarray` accepts).
    table: our module path (param path without the leaf) -> the source module name.
    target: our param tree (shape-dtype leaves), e.g. from `jax.eval_shape`.
    leaf_names: our leaf name -> the source tensor's last name component.

  Returns:
    (params, problems): the param tree (float32 numpy leaves, None where a tensor is missing) and
    one line per kind of problem (missing, left-over, wrongly shaped tensors, unmapped params);
    the conversion succeeded iff `problems` is empty.
  """
  remaining = dict(state_dict)
  missing, mismatched, unmapped = [], [], []

  def convert(path, spec):
    names = tuple(p.key for p in path)
    module, leaf = names[:-1], names[-1]
    if module not in table or leaf not in leaf_names:
      unmapped.append("/".join(names))
      return None
    key = f"{table[module]}.{leaf_names[leaf]}"
    if key not in remaining:
      missing.append(f"{key} (for {'/'.join(names)})")
      return None
    value = to_flax(remaining.pop(key), leaf)
    if value.shape != spec.shape:
      mismatched.append(f"{key}: {value.shape} after layout change, expected {spec.shape}")
    return value

  params = jax.tree_util.tree_map_with_path(convert, target)
  problems = []
  if missing:
    problems.append(f"missing tensors: {missing}")
  if remaining:
    problems.append(f"left-over tensors: {sorted(remaining)}")
  if mismatched:
    problems.append(f"shape mismatches: {mismatched}")
  if unmapped:
    problems.append(f"params without a source tensor name: {unmapped}")
  return params, problems


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray], model_config: ml_collections.ConfigDict
) -> dict[str, Any]:
  """Converts a diffusers `UNet2DModel` state dict to our UNet's `params` collection.

  Args:
    state_dict: tensor name -> array (numpy or anything `np.asarray` accepts).
    model_config: our model config, as returned by `model_config_from_diffusers`.

  Returns:
    The nested `params` tree (float32 numpy arrays): `unet.apply({"params": params}, x, t)`.

  Raises:
    ConversionError: listing the missing, left-over and wrongly shaped tensors, if any.
  """
  params, problems = convert_tensors(
    _rename_deprecated_attention(dict(state_dict)),
    _module_table(model_config),
    config_param_shapes(model_config),
  )
  if problems:
    raise ConversionError(
      "diffusers state dict does not match the UNet of its config: " + "; ".join(problems)
    )
  return params


def find_model_dir(path: str | os.PathLike) -> pathlib.Path:
  """The directory holding the UNet's `config.json`: `path` itself or its `unet/` subfolder.

  A diffusers pipeline directory (model_index.json, unet/, scheduler/) is accepted too.

  Raises:
    ConversionError: saying which files are missing.
  """
  path = pathlib.Path(path)
  for candidate in (path, path / "unet"):
    if (candidate / CONFIG_NAME).is_file():
      if not any((candidate / name).is_file() for name in (SAFETENSORS_NAME, BIN_NAME)):
        raise ConversionError(
          f"{candidate} has {CONFIG_NAME} but no weights: put {SAFETENSORS_NAME} "
          f"(or {BIN_NAME}) next to it"
        )
      return candidate
  raise ConversionError(
    f"{path} is not a diffusers UNet2DModel directory: expected {CONFIG_NAME} and "
    f"{SAFETENSORS_NAME} (or {BIN_NAME}) in it or in its unet/ subfolder"
  )


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
  """Reads a diffusers `config.json`."""
  with open(pathlib.Path(model_dir) / CONFIG_NAME) as f:
    return json.load(f)


def read_state_dict(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads `diffusion_pytorch_model.safetensors` (preferred) or `.bin` into numpy arrays.

  Raises:
    ConversionError: if neither file exists, or a `.bin` is given and torch is not installed.
  """
  model_dir = pathlib.Path(model_dir)
  if (model_dir / SAFETENSORS_NAME).is_file():
    try:
      import safetensors.numpy
    except ImportError as e:
      raise ConversionError(
        f"reading {SAFETENSORS_NAME} needs the safetensors package: pip install safetensors"
      ) from e
    return dict(safetensors.numpy.load_file(str(model_dir / SAFETENSORS_NAME)))
  if (model_dir / BIN_NAME).is_file():
    try:
      import torch
    except ImportError as e:
      raise ConversionError(
        f"{model_dir / BIN_NAME} is a torch pickle and reading it needs torch, which binarydm_jax "
        f"does not install; pip install torch, or download {SAFETENSORS_NAME} instead"
      ) from e
    state_dict = torch.load(model_dir / BIN_NAME, map_location="cpu", weights_only=True)
    return {k: v.detach().to(torch.float32).numpy() for k, v in state_dict.items()}
  raise ConversionError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {model_dir}")


def load_diffusers_unet(
  path: str | os.PathLike,
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Reads and converts a diffusers `UNet2DModel` directory.

  Args:
    path: a directory with `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`),
      or a diffusers pipeline directory with them under `unet/`.

  Returns:
    (model_config, params): our `config.model` section and the `params` tree (numpy float32).
  """
  model_dir = find_model_dir(path)
  model_config = model_config_from_diffusers(read_config(model_dir))
  return model_config, convert_state_dict(read_state_dict(model_dir), model_config)
