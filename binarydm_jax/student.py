"""The student's definition, in one place: the QAT method's settings and the quantized UNet.

What `qat` trains, `workdir` reads back, `export` packs and `efficiency` costs is the same
model: the FP UNet under `student_policy(config, resolve_settings(config.qat, config.quant), ...)`.
Nothing here trains; `qat` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from binarydm_jax.errors import ConfigError
from binarydm_jax.quant import (
  FP_WEIGHT_PRESETS,
  PRESETS,
  multi_basis_configured,
  param_labels,
  policy_from_config,
  with_policy,
)
from binarydm_jax.quant.policy import QuantPolicy

METHODS = ("binarydm", "baseline", "fp")


def resolve_switch_step(qat_config: ml_collections.ConfigDict) -> int:
  """The EBB switch step: `qat.switch_step`, or half of `qat.num_steps` for the default -1."""
  if qat_config.switch_step == -1:
    return qat_config.num_steps // 2
  return qat_config.switch_step


def resolve_component(qat_config: ml_collections.ConfigDict, name: str) -> bool:
  """Whether `qat.ebb` / `qat.lrm` is on: the explicit flag, else the method's default.

  The defaults: binarydm = EBB + LRM, baseline = neither.
  """
  flag = qat_config[name]
  return qat_config.method == "binarydm" if flag is None else flag


@dataclasses.dataclass(frozen=True)
class QATSettings:
  """The resolved ablation switches of `config.qat` (method defaults, then explicit flags)."""

  ebb: bool
  lrm: bool
  switch_step: int


def resolve_settings(
  qat_config: ml_collections.ConfigDict, quant_config: ml_collections.ConfigDict | None = None
) -> QATSettings:
  """Applies the method's defaults: binarydm = EBB + LRM, baseline = neither.

  With `quant_config`, EBB is off when its policy gives no layer a second basis (e.g. the
  'baseline' preset): there is nothing to evolve, so no switch and no EMA restart either.
  """
  if qat_config.method not in METHODS:  # Also checked by validate_config; this is public API.
    raise ConfigError(f"config.qat.method={qat_config.method!r}: expected one of {METHODS}")
  ebb = resolve_component(qat_config, "ebb")
  if quant_config is not None:
    ebb = ebb and multi_basis_configured(quant_config)
  use_lrm = resolve_component(qat_config, "lrm")
  switch = resolve_switch_step(qat_config)
  if not isinstance(switch, int) or switch < 0:
    raise ConfigError(f"config.qat.switch_step={switch!r}: expected -1 (half) or a step >= 0")
  return QATSettings(ebb=ebb, lrm=use_lrm, switch_step=switch)


def student_policy(
  config: ml_collections.ConfigDict,
  settings: QATSettings,
  model: nn.Module,
  image_shape: Sequence[int],
) -> QuantPolicy:
  """The quantization policy; without EBB every binarized layer has one basis (the baseline).

  Raises:
    ConfigError: a `config.quant` value (preset, rule, bits, ...) that builds no policy.
  """
  quant_config = ml_collections.ConfigDict(config.quant.to_dict())
  if not settings.ebb:
    quant_config.head_tail_bases = quant_config.body_bases
  try:
    return policy_from_config(
      quant_config, model, image_shape, num_timesteps=config.diffusion.num_timesteps
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e


def student_model(
  config: ml_collections.ConfigDict, model: nn.Module, image_shape: Sequence[int]
) -> nn.Module:
  """The student of `config`: the FP UNet `model` under the policy the student stage trains.

  Args:
    config: a job config (its `model`, `quant` and `qat` sections).
    model: the job's full-precision UNet (`unet_from_config(config.model)`).
    image_shape: (H, W, C) of what the UNet denoises.

  Returns:
    `model` with the quantization policy of `student_policy`.
  """
  settings = resolve_settings(config.qat, config.quant)
  return with_policy(model, student_policy(config, settings, model, image_shape))


def describe_student(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The student's bit-width (e.g. 'W1A4'; 'W32A32' for the 'fp' preset) and method, for eval.json."""
  settings = resolve_settings(config.qat, config.quant)
  quant = config.quant
  act_bits = quant.act_bits if quant.act_bits != -1 else PRESETS[quant.preset][0]
  weight_bits = 32 if quant.preset in ("fp", *FP_WEIGHT_PRESETS) else 1
  return {
    "bits": "W32A32" if quant.preset == "fp" else f"W{weight_bits}A{act_bits}",
    "method": config.qat.method,
    "ebb": settings.ebb,
    "lrm": settings.lrm,
    "qat_steps": config.qat.num_steps,
  }


def collapse_higher_scales(params: Any, collapsed: jnp.ndarray) -> Any:
  """Sets sigma_II, sigma_III, ... to exactly 0 where `collapsed` (EBB stage 2)."""
  labels = param_labels(params)
  return jax.tree.map(
    lambda p, label: jnp.where(collapsed, jnp.zeros_like(p), p) if label == "scale_higher" else p,
    params,
    labels,
  )
