"""Import first-stage autoencoders (VQ-f4, KL-f8) into `models.autoencoder.Autoencoder` params.

Two sources, the same tensors under two namings:

* diffusers `VQModel` / `AutoencoderKL` state dicts (`config_from_diffusers`,
  `convert_diffusers_state_dict`);
* the CompVis latent-diffusion checkpoints (`model.ckpt` of an LDM, whose first stage lies under
  `first_stage_model.`, or a first-stage `model.ckpt` of its own), `config_from_compvis`,
  `convert_compvis_state_dict`.

Both reuse the UNet converter's bookkeeping (`diffusers_unet.convert_tensors`): each of our params
takes exactly one tensor (conv OIHW -> HWIO, linear (out, in) -> (in, out)), and the missing,
left-over and wrongly shaped tensors are listed together in one `ConversionError`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from binarydm_jax.convert.diffusers_unet import (
  ATTN_NAMES,
  LEAF_NAMES,
  RESNET_NAMES,
  ConversionError,
  convert_tensors,
)
from binarydm_jax.errors import ConfigError
from binarydm_jax.models.autoencoder import Autoencoder, AutoencoderConfig, param_shapes

# Defaults of `diffusers.VQModel.__init__` / `diffusers.AutoencoderKL.__init__` (0.42.1), for the
# fields a `config.json` may omit: the shared ones, then each class's own.
_SHARED_DEFAULTS: dict[str, Any] = {
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ("DownEncoderBlock2D",),
  "up_block_types": ("UpDecoderBlock2D",),
  "block_out_channels": (64,),
  "layers_per_block": 1,
  "act_fn": "silu",
  "norm_num_groups": 32,
  "sample_size": 32,
  "scaling_factor": 0.18215,
  "mid_block_add_attention": True,
}
DIFFUSERS_VQ_DEFAULTS: dict[str, Any] = {
  **_SHARED_DEFAULTS,
  "latent_channels": 3,
  "num_vq_embeddings": 256,
  "vq_embed_dim": None,
  "norm_type": "group",
  "lookup_from_codebook": False,
  "force_upcast": False,
}
DIFFUSERS_KL_DEFAULTS: dict[str, Any] = {
  **_SHARED_DEFAULTS,
  "latent_channels": 4,
  "shift_factor": None,
  "latents_mean": None,
  "latents_std": None,
  "force_upcast": True,
  "use_quant_conv": True,
  "use_post_quant_conv": True,
}
DIFFUSERS_DEFAULTS = {"VQModel": DIFFUSERS_VQ_DEFAULTS, "AutoencoderKL": DIFFUSERS_KL_DEFAULTS}

# Where an LDM checkpoint keeps its first stage, and its latent scale factor (a buffer when the
# LDM was trained with scale_by_std, as LSUN-Churches was; absent otherwise).
COMPVIS_PREFIX = "first_stage_model."
COMPVIS_SCALE_FACTOR = "scale_factor"
# Training-only parts of a stand-alone first-stage checkpoint (LPIPS, discriminator): not loaded.
COMPVIS_LOSS_PREFIX = "loss."
COMPVIS_TARGETS = {
  "ldm.models.autoencoder.VQModelInterface": "vq",
  "ldm.models.autoencoder.VQModel": "vq",
  "ldm.models.autoencoder.AutoencoderKL": "kl",
}
# Sub-modules of our ResBlock / attention block -> their CompVis names.
COMPVIS_RESNET_NAMES = {
  ("norm_1", "norm"): "norm1",
  ("conv_1",): "conv1",
  ("norm_2", "norm"): "norm2",
  ("conv_2",): "conv2",
  ("skip",): "nin_shortcut",
}
COMPVIS_ATTN_NAMES = {
  ("norm", "norm"): "norm",
  ("q",): "q",
  ("k",): "k",
  ("v",): "v",
  ("proj_out",): "proj_out",
}
_LEAF_NAMES = {**LEAF_NAMES, "embedding": "weight"}  # + the VQ codebook


def config_from_diffusers(
  diffusers_config: Mapping[str, Any], scale_factor: float | None = None
) -> AutoencoderConfig:
  """Maps a diffusers `VQModel` / `AutoencoderKL` config onto an `AutoencoderConfig`.

  Args:
    diffusers_config: the content of its `config.json` (missing fields take diffusers' defaults).
    scale_factor: the latent scale factor; None takes `scaling_factor` for AutoencoderKL and 1.0
      for VQModel (diffusers' `LDMPipeline` does not scale VQ latents, and neither does the LDM).

  Raises:
    ConversionError: naming every field our autoencoder cannot reproduce.
  """
  class_name = diffusers_config.get("_class_name")
  if class_name not in DIFFUSERS_DEFAULTS:
    raise ConversionError(
      f"_class_name={class_name!r}: expected one of {sorted(DIFFUSERS_DEFAULTS)} (a diffusers "
      "first-stage autoencoder config.json)"
    )
  defaults = DIFFUSERS_DEFAULTS[class_name]
  unknown = sorted(k for k in diffusers_config if not k.startswith("_") and k not in defaults)
  if unknown:
    logging.warning("Ignoring unknown diffusers %s config fields: %s", class_name, unknown)
  cfg = {**defaults, **diffusers_config}
  problems = []

  def require(field: str, ok: bool, expected: str) -> None:
    if not ok:
      problems.append(f"{field}={cfg[field]!r} (supported: {expected})")

  channels = [int(c) for c in cfg["block_out_channels"]]
  ch = channels[0] if channels else 1
  levels = len(channels)
  require(
    "block_out_channels",
    levels > 0 and all(c % ch == 0 for c in channels),
    "multiples of block_out_channels[0]",
  )
  require(
    "down_block_types",
    list(cfg["down_block_types"]) == ["DownEncoderBlock2D"] * levels,
    "'DownEncoderBlock2D' per block_out_channels entry",
  )
  require(
    "up_block_types",
    list(cfg["up_block_types"]) == ["UpDecoderBlock2D"] * levels,
    "'UpDecoderBlock2D' per block_out_channels entry",
  )
  require("act_fn", cfg["act_fn"] in ("silu", "swish"), "'silu' or 'swish'")
  require("mid_block_add_attention", cfg["mid_block_add_attention"] is True, "true")
  if class_name == "VQModel":
    require("norm_type", cfg["norm_type"] == "group", "'group'")
    require("lookup_from_codebook", not cfg["lookup_from_codebook"], "false")
  else:
    for field in ("use_quant_conv", "use_post_quant_conv"):
      require(field, cfg[field] is True, "true")
    for field in ("shift_factor", "latents_mean", "latents_std"):
      require(field, cfg[field] is None, "null")
  if problems:
    raise ConversionError(
      f"diffusers {class_name} config not supported by binarydm_jax's autoencoder: "
      + "; ".join(problems)
    )
  vq = class_name == "VQModel"
  z_channels = int(cfg["latent_channels"])
  if scale_factor is None:
    scale_factor = 1.0 if vq else float(cfg["scaling_factor"])
  try:
    return AutoencoderConfig(
      kind="vq" if vq else "kl",
      embed_dim=int(cfg["vq_embed_dim"] or z_channels) if vq else z_channels,
      z_channels=z_channels,
      n_embed=int(cfg["num_vq_embeddings"]) if vq else 0,
      ch=ch,
      ch_mult=tuple(c // ch for c in channels),
      num_res_blocks=int(cfg["layers_per_block"]),
      in_channels=int(cfg["in_channels"]),
      out_channels=int(cfg["out_channels"]),
      norm_groups=int(cfg["norm_num_groups"]),
      scale_factor=scale_factor,
    )
  except ConfigError as e:
    raise ConversionError(f"diffusers {class_name} config: {e}") from e


def config_from_compvis(
  first_stage_config: Mapping[str, Any], scale_factor: float = 1.0
) -> AutoencoderConfig:
  """Builds the config from a CompVis LDM yaml's `first_stage_config` section.

  Args:
    first_stage_config: `{"target": ..., "params": {"embed_dim", "n_embed" (VQ), "ddconfig":
      {"z_channels", "ch", "ch_mult", "num_res_blocks", "in_channels", "out_ch",
      "attn_resolutions", "double_z", ...}}}` (as loaded by a yaml reader).
    scale_factor: the LDM's `scale_factor` (1.0 unless the yaml or the checkpoint says otherwise).

  Raises:
    ConversionError: for a target or ddconfig value our autoencoder does not support.
  """
  target = first_stage_config.get("target")
  if target not in COMPVIS_TARGETS:
    raise ConversionError(
      f"first_stage_config target={target!r}: expected one of {sorted(COMPVIS_TARGETS)}"
    )
  kind = COMPVIS_TARGETS[target]
  params = first_stage_config.get("params", {})
  dd = params.get("ddconfig", {})
  problems = []
  if list(dd.get("attn_resolutions", [])):
    problems.append(f"attn_resolutions={list(dd['attn_resolutions'])} (supported: [])")
  if bool(dd.get("double_z", kind == "kl")) != (kind == "kl"):
    problems.append(f"double_z={dd['double_z']} (supported: {kind == 'kl'} for {target})")
  if dd.get("attn_type", "vanilla") != "vanilla":
    problems.append(f"attn_type={dd['attn_type']!r} (supported: 'vanilla')")
  if problems:
    raise ConversionError("CompVis first_stage_config not supported: " + "; ".join(problems))
  try:
    return AutoencoderConfig(
      kind=kind,
      embed_dim=int(params["embed_dim"]),
      z_channels=int(dd["z_channels"]),
      n_embed=int(params["n_embed"]) if kind == "vq" else 0,
      ch=int(dd["ch"]),
      ch_mult=tuple(dd["ch_mult"]),
      num_res_blocks=int(dd["num_res_blocks"]),
      in_channels=int(dd.get("in_channels", 3)),
      out_channels=int(dd.get("out_ch", 3)),
      scale_factor=scale_factor,
    )
  except KeyError as e:
    raise ConversionError(f"CompVis first_stage_config lacks {e.args[0]!r}") from e
  except ConfigError as e:
    raise ConversionError(f"CompVis first_stage_config: {e}") from e


@dataclasses.dataclass(frozen=True)
class _Naming:
  """How a codebase names the autoencoder's modules (besides the shared top-level names)."""

  resnet: Mapping[tuple[str, ...], str]  # our ResBlock sub-modules -> theirs
  attn: Mapping[tuple[str, ...], str]  # our attention sub-modules -> theirs
  mid: tuple[str, str, str]  # res_0, attn, res_1 of the middle block
  norm_out: str
  down: str  # encoder levels
  up: str  # decoder levels
  up_reversed: bool  # decoder levels counted from the coarsest (diffusers) or finest (CompVis)
  block: str  # the ResBlock list inside a level
  downsample: str
  upsample: str


_DIFFUSERS = _Naming(
  RESNET_NAMES,
  ATTN_NAMES,
  ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"),
  "conv_norm_out",
  "down_blocks",
  "up_blocks",
  True,
  "resnets",
  "downsamplers.0.conv",
  "upsamplers.0.conv",
)
_COMPVIS = _Naming(
  COMPVIS_RESNET_NAMES,
  COMPVIS_ATTN_NAMES,
  ("mid.block_1", "mid.attn_1", "mid.block_2"),
  "norm_out",
  "down",
  "up",
  False,
  "block",
  "downsample.conv",
  "upsample.conv",
)


def _module_table(config: AutoencoderConfig, naming: _Naming) -> dict[tuple[str, ...], str]:
  """Our module paths -> the source's module names, for every module the architecture may have."""
  table = {
    ("quant_conv",): "quant_conv",
    ("post_quant_conv",): "post_quant_conv",
    ("quantize",): "quantize.embedding",
  }

  def add(ours: tuple[str, ...], theirs: str, names: Mapping[tuple[str, ...], str]) -> None:
    for sub, name in names.items():
      table[ours + sub] = f"{theirs}.{name}"

  for part in ("encoder", "decoder"):
    table[(part, "conv_in")] = f"{part}.conv_in"
    table[(part, "norm_out", "norm")] = f"{part}.{naming.norm_out}"
    table[(part, "conv_out")] = f"{part}.conv_out"
    for ours, theirs, names in zip(
      ("res_0", "attn", "res_1"),
      naming.mid,
      (naming.resnet, naming.attn, naming.resnet),
      strict=True,
    ):
      add((part, "mid", ours), f"{part}.{theirs}", names)
  levels = len(config.ch_mult)
  for level in range(levels):
    down = f"encoder.{naming.down}.{level}"
    up = f"decoder.{naming.up}.{levels - 1 - level if naming.up_reversed else level}"
    for j in range(config.num_res_blocks + 1):
      add(("encoder", f"down_{level}_res_{j}"), f"{down}.{naming.block}.{j}", naming.resnet)
      add(("decoder", f"up_{level}_res_{j}"), f"{up}.{naming.block}.{j}", naming.resnet)
    table[("encoder", f"down_{level}_downsample")] = f"{down}.{naming.downsample}"
    table[("decoder", f"up_{level}_upsample")] = f"{up}.{naming.upsample}"
  return table


def _convert(state_dict: Mapping[str, Any], table: dict, config: AutoencoderConfig, what: str):
  params, problems = convert_tensors(
    state_dict, table, param_shapes(Autoencoder(config)), _LEAF_NAMES
  )
  if problems:
    raise ConversionError(
      f"{what} does not match the {config.kind.upper()} autoencoder of its config "
      f"(ch={config.ch}, ch_mult={config.ch_mult}, num_res_blocks={config.num_res_blocks}, "
      f"embed_dim={config.embed_dim}): " + "; ".join(problems)
    )
  return params


def convert_diffusers_state_dict(
  state_dict: Mapping[str, Any], config: AutoencoderConfig
) -> dict[str, Any]:
  """Converts a diffusers `VQModel` / `AutoencoderKL` state dict to `Autoencoder` params.

  Args:
    state_dict: tensor name -> torch tensor or numpy array.
    config: the architecture, e.g. from `config_from_diffusers`.

  Returns:
    The `params` tree (float32 numpy leaves) of `Autoencoder(config)`.

  Raises:
    ConversionError: listing the missing, left-over and wrongly shaped tensors, if any.
  """
  return _convert(state_dict, _module_table(config, _DIFFUSERS), config, "diffusers state dict")


def _squeeze_attention_convs(key: str, value: Any) -> Any:
  """CompVis attention q/k/v/proj_out are 1x1 convs (O, I, 1, 1); ours are dense layers."""
  parts = key.split(".")
  if len(parts) >= 3 and parts[-3] == "attn_1" and parts[-1] == "weight":
    array = np.asarray(value)
    if array.ndim == 4 and array.shape[2:] == (1, 1):
      return array[:, :, 0, 0]
  return value


def convert_compvis_state_dict(
  state_dict: Mapping[str, Any], config: AutoencoderConfig, prefix: str = COMPVIS_PREFIX
) -> tuple[AutoencoderConfig, dict[str, Any]]:
  """Converts the first stage of a CompVis latent-diffusion checkpoint to `Autoencoder` params.

  Consumes the tensors under `prefix` (all of them but the training-only `loss.` ones) and the
  top-level `scale_factor`, if any; every other tensor (the UNet's, the schedule's) is left to
  its own converter.

  Args:
    state_dict: the checkpoint's `state_dict` (tensor name -> torch tensor or numpy array).
    config: the architecture, e.g. `models.autoencoder.VQ_F4` or from `config_from_compvis`.
    prefix: `first_stage_model.` for an LDM checkpoint, '' for a first-stage checkpoint.

  Returns:
    (config, params): `config` with the checkpoint's `scale_factor` where it stores one, and the
    `params` tree of `Autoencoder(config)`.

  Raises:
    ConversionError: when the checkpoint holds no first-stage tensors (one line), or listing the
      missing, left-over and wrongly shaped tensors.
  """
  ours = {
    key[len(prefix) :]: _squeeze_attention_convs(key, value)
    for key, value in state_dict.items()
    if key.startswith(prefix) and not key[len(prefix) :].startswith(COMPVIS_LOSS_PREFIX)
  }
  if not prefix:  # a top-level scale_factor is not a first-stage tensor
    ours.pop(COMPVIS_SCALE_FACTOR, None)
  if not ours:
    raise ConversionError(
      f"the checkpoint has no first-stage weights (no tensor named {prefix}*): pass an LDM "
      "model.ckpt that includes its first stage, or the first-stage model.ckpt with prefix=''"
    )
  params = _convert(
    ours, _module_table(config, _COMPVIS), config, f"CompVis first stage ({prefix}*)"
  )
  if COMPVIS_SCALE_FACTOR in state_dict:
    scale = float(np.asarray(state_dict[COMPVIS_SCALE_FACTOR]))
    config = dataclasses.replace(config, scale_factor=scale)
  return config, params
