"""A job's trained models, read back from its workdir: the FP teacher and the QAT student.

Both come with the job's config as saved beside the checkpoint (so sampling settings and the
diffusion schedule are the ones the job used) and their EMA params (what the job samples).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from binarydm_jax import student
from binarydm_jax.convert.teacher import load_teacher
from binarydm_jax.errors import UserError
from binarydm_jax.models.unet import param_shapes, unet_from_config
from binarydm_jax.runtime import fileio

STUDENT_ADVICE = (
  "train one with python -m binarydm_jax.main --config=CONFIG --workdir={workdir} "
  "(config.qat.method binarydm or baseline; the student stage saves WORKDIR/student/<step>)"
)


class WorkdirError(UserError):
  """A workdir without the requested checkpoint, or one that does not match its config."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A model read back from a workdir.

  Attributes:
    config: the job's config saved with the checkpoint.
    model: the UNet (the student: with its quantization policy).
    params: the EMA params (the inner `params` dict).
    step: the training step of the checkpoint (None for a teacher read from `teacher.source`).
  """

  config: ml_collections.ConfigDict
  model: nn.Module
  params: Any
  step: int | None


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the job's images."""
  return (config.data.image_size, config.data.image_size, config.model.channels)


def _latest(stage_dir: epath.Path, with_state: bool) -> tuple[int, dict[str, Any]] | None:
  """(step, {'config': dict[, 'state': dict]}) of the stage's latest checkpoint, or None."""
  if not stage_dir.is_dir():
    return None
  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(fileio.absolute(stage_dir), options=options) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    items = {"config": ocp.args.JsonRestore()}
    if with_state:
      items["state"] = ocp.args.StandardRestore()
    return step, manager.restore(step, args=ocp.args.Composite(**items))


def student_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The QAT student of a job's `config` (`student.student_model` of its UNet and images)."""
  return student.student_model(config, unet_from_config(config.model), image_shape(config))


def load_student(workdir: str | os.PathLike) -> TrainedModel:
  """The latest student checkpoint of a job (WORKDIR/student), rebuilt from its own config.

  Raises:
    WorkdirError: no student checkpoint, or params that do not fit the config's student.
  """
  workdir = epath.Path(workdir)
  found = _latest(workdir / "student", with_state=True)
  if found is None:
    raise WorkdirError(
      f"{workdir / 'student'} holds no student checkpoint; {STUDENT_ADVICE.format(workdir=workdir)}"
    )
  step, items = found
  config = ml_collections.ConfigDict(items["config"])
  model = student_model(config)
  params = items["state"]["ema_params"]  # What the job samples and evaluates with.
  if _shapes(params) != _shapes(param_shapes(model, image_shape(config))):
    raise WorkdirError(
      f"{workdir / 'student'}/{step}: its params do not match the student of its own config"
    )
  return TrainedModel(config, model, params, step)


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def load_teacher_stage(workdir: str | os.PathLike) -> TrainedModel:
  """The job's FP teacher: WORKDIR/teacher, else the `teacher.source` the student was trained from.

  Raises:
    WorkdirError: neither a teacher checkpoint nor a student whose config names a teacher source.
  """
  workdir = epath.Path(workdir)
  for stage in ("teacher", "student"):
    found = _latest(workdir / stage, with_state=False)
    if found is None:
      continue
    step, items = found
    config = ml_collections.ConfigDict(items["config"])
    source = workdir / "teacher" if stage == "teacher" else config.teacher.source
    if source is None:
      continue
    model_config, params = load_teacher(source)
    step = step if stage == "teacher" else None
    return TrainedModel(config, unet_from_config(model_config), params, step)
  raise WorkdirError(
    f"{workdir} holds no teacher checkpoint (WORKDIR/teacher) and no student trained from a "
    "config.teacher.source; train one with python -m binarydm_jax.main --workdir=WORKDIR"
  )
