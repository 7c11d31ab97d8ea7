"""Convert a CompVis latent-diffusion `model.ckpt` into our teacher and first-stage checkpoints.

The published LDMs (LSUN-Bedrooms, FFHQ, LSUN-Churches) are PyTorch Lightning checkpoints whose
`state_dict` holds the UNet (`model.diffusion_model.*`, `compvis_unet`), the first stage
(`first_stage_model.*`, `diffusers_autoencoder.convert_compvis_state_dict`), the schedule's
buffers (`betas`, `alphas_cumprod`, ...), for LSUN-Churches the latent `scale_factor`, and, when
trained with EMA, the EMA copy of the UNet under `model_ema.diffusion_model<name without dots>`.
The job config names the architecture: the UNet is checked against `config.model`, the first
stage against `config.first_stage`, `betas` against `config.diffusion`.

torch is imported only here, to read the pickle; the library itself does not need it.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from binarydm_jax.convert import compvis_unet, teacher
from binarydm_jax.convert.diffusers_autoencoder import convert_compvis_state_dict
from binarydm_jax.convert.diffusers_unet import ConversionError
from binarydm_jax.data import first_stage
from binarydm_jax.diffusion import schedule_from_config
from binarydm_jax.models.autoencoder import AutoencoderConfig
from binarydm_jax.models.unet import count_params
from binarydm_jax.runtime import fileio

DOWNLOADS = "https://ommer-lab.com/files/latent-diffusion/"
EXPECTED = (
  f"the model.ckpt of a CompVis latent diffusion model, unpacked from {DOWNLOADS}"
  "lsun_bedrooms.zip (LSUN-Bedrooms), ffhq.zip (FFHQ) or lsun_churches.zip (LSUN-Churches)"
)
EMA_PREFIX = "model_ema."
EMA_UNET_PREFIX = EMA_PREFIX + "diffusion_model"
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
# Modules whose classes a PyTorch Lightning training checkpoint pickles besides the weights
# (callback state keys); `read_state_dict` lets them load as inert stand-ins.
TRAINER_MODULES = ("pytorch_lightning.", "lightning.")
REASON_CHARS = 160  # Of torch's error message, in ours.
UNPICKLER_DETAIL = "WeightsUnpickler error:"
TEACHER_DIR = "teacher"
FIRST_STAGE_DIR = "first_stage"


class LdmWeights(NamedTuple):
  """A converted LDM: our UNet's model config and params, and its first stage's."""

  model_config: ml_collections.ConfigDict
  params: Any
  first_stage_config: AutoencoderConfig
  first_stage_params: Any


def _trainer_stand_ins(torch: Any, path: pathlib.Path) -> list[tuple[type, str]]:
  """Empty classes named as the Lightning globals that `path` pickles.

  Raises:
    ConversionError: if it pickles any other global (which weights_only loading refuses).
  """
  try:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  except Exception:  # noqa: BLE001  (not a zip checkpoint: torch.load says why)
    return []
  foreign = [name for name in names if not name.startswith(TRAINER_MODULES)]
  if foreign:
    raise ConversionError(
      f"{path} pickles objects other than tensors ({', '.join(foreign[:3])}), which are not "
      f"loaded (torch.load weights_only=True); expected {EXPECTED}"
    )
  return [(type(name.rsplit(".", 1)[-1], (), {}), name) for name in names]


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the `state_dict` of a Lightning `model.ckpt` as float32 numpy arrays.

  The file is read with `torch.load(..., weights_only=True)`: tensors and plain containers only,
  plus inert stand-ins for the Lightning classes a training checkpoint pickles; any other object
  makes it fail.

  Raises:
    ConversionError: one line, if the file is missing, unreadable or has no `state_dict`.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise ConversionError(f"{path}: no such file; expected {EXPECTED}")
  try:
    import torch
  except ImportError as e:
    raise ConversionError(
      f"reading {path} (a torch pickle) needs torch, which binarydm_jax does not install: "
      "pip install torch"
    ) from e
  stand_ins = _trainer_stand_ins(torch, path)
  try:
    with torch.serialization.safe_globals(stand_ins):
      checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (corrupt, foreign objects, not a torch file: one advice)
    # torch's own advice (weights_only=False) precedes the unpickler's detail: keep the detail.
    detail = str(e).split(UNPICKLER_DETAIL)[-1]
    reason = f"{type(e).__name__}: {' '.join(detail.split())}"[:REASON_CHARS]
    raise ConversionError(f"torch could not read {path} ({reason}); expected {EXPECTED}") from e
  state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
  if not isinstance(state_dict, Mapping):
    raise ConversionError(
      f"{path} has no state_dict (not a Lightning checkpoint); expected {EXPECTED}"
    )
  return {
    k: v.detach().to(torch.float32).numpy() for k, v in state_dict.items() if torch.is_tensor(v)
  }


def unet_tensors(state_dict: Mapping[str, Any], use_ema: bool = True) -> dict[str, Any]:
  """The UNet's tensors under their `model.diffusion_model.` names: the EMA copy if asked and
  present (LitEma names `model_ema.diffusion_model<name without dots>`), else the trained ones.

  Raises:
    ConversionError: if the EMA copy does not have exactly one tensor per UNet tensor.
  """
  prefix = compvis_unet.PREFIX
  model = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  ema = {
    k: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING
  }
  if not (use_ema and ema):
    if ema:
      logging.info("Using the trained UNet weights, not the EMA ones (use_ema=False)")
    return model
  names = {k: EMA_UNET_PREFIX + k[len(prefix) :].replace(".", "") for k in model}
  missing = sorted(k for k, e in names.items() if e not in ema)
  extra = sorted(ema.keys() - set(names.values()))
  if missing or extra:
    raise ConversionError(
      f"the checkpoint's EMA weights ({EMA_PREFIX}*) do not match its UNet: "
      f"{len(missing)} UNet tensors without EMA ({missing[:3]}), {len(extra)} EMA tensors "
      f"without a UNet tensor ({extra[:3]}); pass use_ema=False (--nouse_ema) to convert the "
      "trained weights"
    )
  logging.info("Using the UNet's EMA weights (%s*)", EMA_PREFIX)
  return {k: ema[e] for k, e in names.items()}


def _summary(betas: np.ndarray) -> str:
  return f"{len(betas)} steps, {betas[0]:.6g} to {betas[-1]:.6g}"


def check_schedule(state_dict: Mapping[str, Any], diffusion_config: ml_collections.ConfigDict):
  """Checks the checkpoint's `betas` (if it stores them) against `config.diffusion`'s schedule.

  Raises:
    ConversionError: naming both schedules when they differ.
  """
  if "betas" not in state_dict:
    return
  found = np.asarray(state_dict["betas"], np.float64).reshape(-1)
  ours = np.asarray(schedule_from_config(diffusion_config).betas, np.float64)
  if found.shape != ours.shape or not np.allclose(found, ours, rtol=1e-5, atol=0.0):
    raise ConversionError(
      f"the checkpoint's betas ({_summary(found)}) are not those of config.diffusion "
      f"(beta_schedule={diffusion_config.beta_schedule!r}, beta_start={diffusion_config.beta_start},"
      f" beta_end={diffusion_config.beta_end}, num_timesteps={diffusion_config.num_timesteps}: "
      f"{_summary(ours)}); use the config of this checkpoint's model (its yaml's linear_start, "
      "linear_end and timesteps)"
    )


def teacher_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The teacher's model config: `config.model`'s architecture fields and dropout, `image_size`."""
  fields = (*teacher.ARCHITECTURE_FIELDS, "dropout")
  section = {f: config.model[f] for f in fields if f in config.model}
  return ml_collections.ConfigDict({**section, "image_size": config.data.image_size})


def convert_state_dict(
  state_dict: Mapping[str, Any], config: ml_collections.ConfigDict, use_ema: bool = True
) -> LdmWeights:
  """Converts an LDM checkpoint's `state_dict` to our UNet and first-stage params.

  Args:
    state_dict: tensor name -> array (numpy or torch).
    config: the job config of that model (e.g. configs/lsun_bedrooms.py): its `model`, `data`,
      `first_stage` and `diffusion` sections name the architecture and schedule.
    use_ema: take the UNet's EMA weights when the checkpoint holds them (what the LDM samples
      with, inside its `ema_scope`).

  Returns:
    The converted weights (numpy float32 leaves); the first stage's config carries the
    checkpoint's `scale_factor` where it stores one.

  Raises:
    ConversionError: one line naming what differs (architecture, schedule, missing parts).
  """
  expected = first_stage.autoencoder_config(config)
  if expected is None:
    raise ConversionError(
      "config.first_stage.kind is '': the config describes a pixel-space model; pass the config "
      "of the checkpoint's latent diffusion model (configs/lsun_bedrooms.py, ffhq.py, "
      "lsun_churches.py)"
    )
  check_schedule(state_dict, config.diffusion)
  model_config = teacher_model_config(config)
  params = compvis_unet.convert_state_dict(unet_tensors(state_dict, use_ema), model_config)
  ae_config, ae_params = convert_compvis_state_dict(state_dict, expected)
  return LdmWeights(model_config, params, ae_config, ae_params)


def convert_ldm_checkpoint(
  checkpoint: str | os.PathLike,
  config: ml_collections.ConfigDict,
  output: str | os.PathLike,
  overwrite: bool = False,
  use_ema: bool = True,
) -> tuple[epath.Path, epath.Path]:
  """Converts a CompVis LDM `model.ckpt` and writes OUTPUT/teacher and OUTPUT/first_stage.

  Args:
    checkpoint: the `model.ckpt` (see `EXPECTED`).
    config: the job config of that model (e.g. configs/lsun_bedrooms.py).
    output: the directory to write the two orbax checkpoints into.
    overwrite: replace them if they exist.
    use_ema: see `convert_state_dict`.

  Returns:
    (teacher path, first-stage path): the values for `config.teacher.source` and
    `config.first_stage.source`.

  Raises:
    ConversionError / TeacherError: one line saying what is wrong and what to do.
  """
  output = fileio.absolute(output)
  existing = [str(output / d) for d in (TEACHER_DIR, FIRST_STAGE_DIR) if (output / d).exists()]
  if existing and not overwrite:
    raise ConversionError(f"{' and '.join(existing)} already exist(s); remove or pass --overwrite")
  weights = convert_state_dict(read_state_dict(checkpoint), config, use_ema=use_ema)
  teacher_path = teacher.save_teacher(
    output / TEACHER_DIR, weights.model_config, weights.params, overwrite=overwrite
  )
  stage_path = first_stage.save(
    output / FIRST_STAGE_DIR,
    weights.first_stage_config,
    weights.first_stage_params,
    overwrite=overwrite,
  )
  logging.info(
    "Wrote the UNet (%d params) to %s and the %s first stage (%d params, scale_factor %g) to %s",
    count_params(weights.params),
    teacher_path,
    weights.first_stage_config.kind.upper(),
    count_params(weights.first_stage_params),
    weights.first_stage_config.scale_factor,
    stage_path,
  )
  return teacher_path, stage_path
