"""Checks a config before any work starts, so a bad value is one line naming the key and the fix."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections

from binarydm_jax import student
from binarydm_jax.data import first_stage
from binarydm_jax.data.image_folder import MODES
from binarydm_jax.data.input_pipeline import DATASET_NAMES
from binarydm_jax.diffusion import BETA_SCHEDULES
from binarydm_jax.errors import ConfigError
from binarydm_jax.evaluation.score import MIN_SAMPLES
from binarydm_jax.export import FP_DTYPES
from binarydm_jax.models.autoencoder import AutoencoderConfig
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.training.qat_optim import EBB_REDUCTIONS, LR_SCHEDULES
from binarydm_jax.training.switch import HANDOVERS

_REQUIRED = object()
# `_validate_quant`'s keys of the student policies that built.
_BUILT_POLICIES: set[str] = set()


def _get(config: ml_collections.ConfigDict, key: str, default: Any = _REQUIRED) -> Any:
  """The value at dotted `key`; `default` if given and the last field is absent."""
  *sections, field = key.split(".")
  value = config
  for part in sections:
    value = value[part]
  return value[field] if default is _REQUIRED else value.get(field, default)


def _check(
  config: ml_collections.ConfigDict,
  key: str,
  ok: Callable[[Any], bool],
  expected: str,
  default: Any = _REQUIRED,
) -> None:
  """Raises ConfigError unless `ok(value)`; `default` makes the field optional."""
  value = _get(config, key, default)
  if not ok(value):
    raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def _one_of(options: Iterable[Any]) -> tuple[Callable[[Any], bool], str]:
  options = tuple(options)
  return (lambda v: v in options), f"one of {options}"


def _positive_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
  return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _positive_ints(v: Any) -> bool:
  return isinstance(v, tuple | list) and len(v) > 0 and all(_positive_int(x) for x in v)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid field of `config`."""
  _check(config, "data.name", *_one_of(DATASET_NAMES))
  if config.data.name == "folder":
    _check(
      config,
      "data.data_dir",
      lambda v: isinstance(v, str) and bool(v),
      "a directory of PNG/JPEG files with data.name='folder'",
    )
    _check(
      config,
      "model.channels",
      lambda v: v in MODES or bool(config.get("first_stage", {}).get("kind")),
      "1 (grayscale) or 3 (RGB) with data.name='folder'",
    )
  _check(config, "data.image_size", _positive_int, "a positive int")
  _check(config, "data.heldout_fraction", lambda v: 0.0 < v < 1.0, "a fraction in (0, 1)")
  _check(config, "model.ch", _positive_int, "a positive int")
  _check(config, "model.ch_mult", _positive_ints, "a non-empty tuple of positive ints")
  _check(config, "model.num_res_blocks", _positive_int, "a positive int")
  _check(config, "model.channels", _positive_int, "a positive int")
  _check(config, "model.attn_resolutions", lambda v: isinstance(v, tuple | list), "a tuple of ints")
  _check(config, "model.dropout", lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)")
  _check(config, "model.dtype", *_one_of(("float32", "bfloat16", "float16")))
  _check(config, "model.downsample_padding", *_one_of(("asymmetric", "symmetric")))
  _check(config, "model.norm_groups", _positive_int, "a positive int")
  groups = config.model.norm_groups
  for mult in config.model.ch_mult:
    if (config.model.ch * mult) % groups:
      raise ConfigError(
        f"config.model.norm_groups={groups!r}: must divide every level's channels "
        f"(model.ch * ch_mult = {config.model.ch * mult})"
      )
  levels = len(config.model.ch_mult) - 1
  if config.data.image_size % (2**levels):
    raise ConfigError(
      f"config.data.image_size={config.data.image_size}: must be divisible by 2**{levels} "
      f"(len(model.ch_mult) - 1 downsamplings)"
    )
  heads = config.model.get("num_head_channels", -1)
  _check(
    config,
    "model.num_head_channels",
    lambda v: v == -1 or _positive_int(v),
    "-1 (one head) or a positive int",
  )
  _check(
    config,
    "model.num_heads",
    lambda v: v == -1 or _positive_int(v),
    "-1 (num_head_channels decides) or a positive int",
    default=-1,
  )
  num_heads = config.model.get("num_heads", -1)
  if num_heads != -1 and heads != -1:
    raise ConfigError(
      f"config.model.num_heads={num_heads}: set either it or model.num_head_channels "
      f"(={heads}), and the other to -1"
    )
  for level, mult in enumerate(config.model.ch_mult):
    attn = config.data.image_size // 2**level in config.model.attn_resolutions
    width = config.model.ch * mult
    for key, value in (("num_head_channels", heads), ("num_heads", num_heads)):
      if value != -1 and (attn or level == levels) and width % value:
        raise ConfigError(
          f"config.model.{key}={value}: must divide the channels of every attention "
          f"layer (model.ch * ch_mult = {width})"
        )
  for key in ("use_scale_shift_norm", "resblock_updown"):
    _check(config, f"model.{key}", lambda v: isinstance(v, bool), "True or False", default=False)
  _check(config, "diffusion.beta_schedule", *_one_of(BETA_SCHEDULES))
  _check(config, "diffusion.num_timesteps", _positive_int, "a positive int")
  _check(
    config,
    "diffusion.beta_end",
    lambda v: 0.0 < config.diffusion.beta_start < v < 1.0,
    "0 < diffusion.beta_start < beta_end < 1",
  )
  for key in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every"):
    _check(config, f"training.{key}", _positive_int, "a positive int")
  _check(config, "training.num_steps", _non_negative_int, "a non-negative int")
  _check(
    config,
    "training.divergence_factor",
    lambda v: _number(v) and (v == 0 or v > 1),
    "0 (no divergence guard) or a factor > 1",
  )
  _check(
    config,
    "training.divergence_steps",
    _non_negative_int,
    "a non-negative int (0: no divergence guard)",
  )
  _check(config, "training.divergence_window", _positive_int, "a positive int")
  _check(config, "optim.learning_rate", lambda v: v > 0, "a positive float")
  _check(config, "optim.warmup_steps", _non_negative_int, "a non-negative int")
  _check(config, "optim.ema_decay", lambda v: 0.0 <= v < 1.0, "a decay in [0, 1)")
  _check(config, "optim.ema_warmup", lambda v: isinstance(v, bool), "True or False")
  _validate_qat(config)
  first_stage_config = _validate_first_stage(config)
  _check(config, "sampling.sampler", *_one_of(("ddim", "ddpm")))
  _check(
    config,
    "sampling.ddim_steps",
    lambda v: _positive_int(v) and v <= config.diffusion.num_timesteps,
    "an int in [1, diffusion.num_timesteps]",
  )
  _check(config, "sampling.variance", *_one_of(("fixedlarge", "fixedsmall")))
  _check(config, "sampling.grid_size", _positive_int, "a positive int")
  _check(config, "eval.metric", *_one_of(("digits_fid", "inception", "none")))
  if config.eval.metric == "digits_fid" and config.data.name != "digits":
    raise ConfigError(
      f"config.eval.metric='digits_fid' needs data.name='digits' (got {config.data.name!r}); "
      "set --config.eval.metric=none, or 'inception' for RGB images"
    )
  rgb = config.data.name != "digits" and (config.model.channels == 3 or first_stage_config)
  if config.eval.metric == "inception" and not rgb:
    raise ConfigError(
      f"config.eval.metric='inception' needs RGB images (data.name={config.data.name!r}, "
      f"model.channels={config.model.channels}); set --config.eval.metric=none"
    )

  least = MIN_SAMPLES["cifar10"] if config.eval.metric == "inception" else 2
  _check(
    config, "eval.num_samples", lambda v: isinstance(v, int) and v >= least, f"an int >= {least}"
  )
  _check(
    config, "eval.inception_dir", lambda v: v is None or isinstance(v, str), "None or a directory"
  )
  _check(
    config,
    "eval.allow_few_samples",
    lambda v: isinstance(v, bool),
    "True or False (score fewer samples than a metric needs, marked unreliable)",
    default=False,
  )
  _check(config, "eval.batch_size", _positive_int, "a positive int")
  _check(config, "eval.seed", lambda v: _non_negative_int(v) and v < 2**32, "an int in [0, 2**32)")
  _check(
    config, "mesh.data", lambda v: v == -1 or _positive_int(v), "-1 (all devices) or a positive int"
  )
  _check(config, "mesh.fsdp", _positive_int, "a positive int")
  _validate_quant(config)  # Last: it traces the UNet, after every cheap check has passed.


def _validate_first_stage(config: ml_collections.ConfigDict) -> AutoencoderConfig | None:
  """Checks `config.first_stage` against the data, UNet and sampler; returns its architecture."""
  if "first_stage" not in config:
    return None
  _check(config, "first_stage.kind", *_one_of(first_stage.KINDS))
  ae = first_stage.autoencoder_config(config)  # ConfigError on an inconsistent architecture.
  if ae is None:
    return None
  if config.data.name == "digits":
    raise ConfigError(
      "config.first_stage.kind: the first stages are RGB autoencoders and digits are grayscale; "
      "set --config.first_stage.kind='' or another data.name"
    )
  if not (config.first_stage.source or config.first_stage.random_init):
    first_stage.from_config(config)  # Raises the ConfigError that says how to get one.
  _check(config, "first_stage.encode_batch_size", _positive_int, "a positive int")
  _check(
    config,
    "sampling.clip_denoised",
    lambda v: v is False,
    "False with a first stage (latents are not in [-1, 1]; the decoded images are clipped)",
  )
  return ae


def _validate_quant(config: ml_collections.ConfigDict) -> None:
  """The `quant` section, by building the student's policy as the student stage will.

  Building it traces the UNet (seconds), so the inputs of each policy that built are remembered:
  the policy is a pure function of them.
  """
  settings = student.resolve_settings(config.qat, config.quant)
  image_shape = (config.data.image_size, config.data.image_size, config.model.channels)
  key = json.dumps(
    [config.model.to_dict(), config.quant.to_dict(), settings.ebb, image_shape],
    sort_keys=True,
    default=repr,
  )
  if key not in _BUILT_POLICIES:
    student.student_policy(config, settings, unet_from_config(config.model), image_shape)
    _BUILT_POLICIES.add(key)


def _validate_qat(config: ml_collections.ConfigDict) -> None:
  """The `qat` section."""
  _check(config, "qat.method", *_one_of(("binarydm", "baseline", "fp")))
  for key in ("ebb", "lrm"):
    _check(config, f"qat.{key}", lambda v: v is None or isinstance(v, bool), "None, True or False")
  for key in ("batch_size", "lrm_reduction", "lrm_num_batches"):
    _check(config, f"qat.{key}", _positive_int, "a positive int")
  for key in ("num_steps", "warmup_steps"):
    _check(config, f"qat.{key}", _non_negative_int, "a non-negative int")
  _check(config, "qat.learning_rate", lambda v: v > 0, "a positive float")
  _check(
    config,
    "qat.act_learning_rate",
    lambda v: v == -1 or v > 0,
    "-1 (qat.learning_rate) or > 0",
    default=-1.0,
  )
  _check(config, "qat.lr_schedule", *_one_of(LR_SCHEDULES))
  _check(config, "qat.weight_decay", lambda v: v >= 0, "a float >= 0")
  _check(config, "qat.ema_decay", lambda v: 0.0 <= v < 1.0, "a decay in [0, 1)")
  for key in ("ema_warmup", "ema_restart_at_switch"):
    _check(config, f"qat.{key}", lambda v: isinstance(v, bool), "True or False")
  _check(
    config,
    "qat.switch_step",
    lambda v: v == -1 or _non_negative_int(v),
    "-1 (half of qat.num_steps) or a step >= 0",
  )
  _check(config, "qat.ebb_form", *_one_of(("paper", "decoupled")))
  _check(config, "qat.ebb_tau", lambda v: v >= 0, "a float >= 0")
  _check(config, "qat.ebb_reduction", *_one_of(EBB_REDUCTIONS))
  _check(config, "qat.ebb_absolute", lambda v: isinstance(v, bool), "True or False")

  _check(config, "export.fp_dtype", *_one_of(FP_DTYPES))
  _check(config, "export.quant_dtype", *_one_of(FP_DTYPES))
  _check(config, "qat.switch_handover", *_one_of(HANDOVERS))
  _check(config, "qat.ebb_target_ratio", lambda v: 0.0 < v < 1.0, "a ratio in (0, 1)")
  _check(config, "qat.lrm_weight", lambda v: v >= 0, "a float >= 0")
  _check(config, "qat.lrm_axis", *_one_of(("channel", "width")))
  _validate_qat_schedule(config.qat)


def _validate_qat_schedule(qat: ml_collections.ConfigDict) -> None:
  """Cross-field checks: the EBB switch must fall inside the run, and after the lr warmup."""
  switch = student.resolve_switch_step(qat)
  if qat.method != "fp" and student.resolve_component(qat, "ebb") and 0 < qat.num_steps <= switch:
    raise ConfigError(
      f"config.qat.switch_step={qat.switch_step!r}: the EBB switch (step {switch}) must come "
      f"before qat.num_steps={qat.num_steps}, or the extra bases are never removed and the "
      "student is not 1-bit; use -1 (half the steps), a smaller step, or qat.ebb=False"
    )
  if qat.lr_schedule == "cosine_stage2" and qat.warmup_steps > switch:
    raise ConfigError(
      f"config.qat.warmup_steps={qat.warmup_steps!r}: with qat.lr_schedule='cosine_stage2' the "
      f"decay starts at the EBB switch (step {switch}), which would cut the warmup short; use at "
      "most that many warmup steps or a later qat.switch_step"
    )
