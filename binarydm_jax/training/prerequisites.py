"""What a job needs besides a valid config, looked for before any work; every missing one at once.

The training images (a prepared tfds dataset or an image folder), the teacher (`teacher.source`),
the first stage (`first_stage.source`) and the FID Inception weights (`eval.metric='inception'`).
Nothing is loaded here: only whether each is where the config says.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from binarydm_jax.convert import teacher
from binarydm_jax.data import first_stage, input_pipeline
from binarydm_jax.errors import PrerequisiteError, UserError
from binarydm_jax.evaluation import inception


def _data(config: ml_collections.ConfigDict) -> None:
  input_pipeline.check_available(config.data)


def _teacher(config: ml_collections.ConfigDict) -> None:
  if config.teacher.source:
    teacher.check_source(config.teacher.source)


def _inception(config: ml_collections.ConfigDict) -> None:
  if config.eval.metric == "inception":
    inception.check_weights(config.eval.inception_dir)


CHECKS: tuple[Callable[[ml_collections.ConfigDict], None], ...] = (
  _data,
  _teacher,
  first_stage.check_source,
  _inception,
)


def missing(config: ml_collections.ConfigDict) -> list[UserError]:
  """The error of each missing prerequisite of the job `config` (empty: nothing is missing)."""
  errors = []
  for check in CHECKS:
    try:
      check(config)
    except UserError as e:
      errors.append(e)
  return errors


def check(config: ml_collections.ConfigDict) -> None:
  """Fails, before any work, when the job `config` lacks a prerequisite.

  Raises:
    UserError: the error of the one missing prerequisite (e.g. `DatasetNotFoundError`,
      `InceptionError`), or a PrerequisiteError whose one line names all of them, numbered.
  """
  errors = missing(config)
  if len(errors) == 1:
    raise errors[0]
  if errors:
    listed = " ".join(f"({i}) {error}" for i, error in enumerate(errors, 1))
    raise PrerequisiteError(f"{len(errors)} things this job needs are missing: {listed}")
