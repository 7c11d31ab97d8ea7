"""Converts a diffusers UNet2DModel (directory or hub id) into an orbax teacher checkpoint.

The flags live in `__main__.py`, so importing this module defines none.
"""

from __future__ import annotations

import os

from absl import logging
from etils import epath

from binarydm_jax.convert import teacher
from binarydm_jax.models.unet import count_params


def convert_teacher(
  source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False
) -> epath.Path:
  """Loads `source` (see `teacher.load_teacher`) and writes it to `output` as an orbax checkpoint.

  Args:
    source: a diffusers UNet2DModel directory, a hub id, or an orbax teacher checkpoint.
    output: the checkpoint directory to create.
    overwrite: replace `output` if it exists.

  Returns:
    The path of the written checkpoint (absolute if local).
  """
  model_config, params = teacher.load_teacher(source)
  path = teacher.save_teacher(output, model_config, params, overwrite=overwrite)
  logging.info(
    "Wrote teacher %s (%d params) to %s; model config:\n%s",
    source,
    count_params(params),
    path,
    model_config,
  )
  return path
