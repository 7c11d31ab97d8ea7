"""Rebuilds the quantized UNet and its params from an export directory alone."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from binarydm_jax.models.unet import param_shapes
from binarydm_jax.quant import int8_params
from binarydm_jax.quant.int8 import INT8
from binarydm_jax.runtime import fileio

from . import layout, manifest
from .manifest import ExportError


def _restore_blobs(path: epath.Path, parts: dict[str, Any]) -> dict[str, np.ndarray]:
  with ocp.StandardCheckpointer() as checkpointer:
    blobs = checkpointer.restore(fileio.absolute(path))
  for name, part in parts.items():
    blob = np.asarray(blobs.get(name, np.zeros(0)))
    if blob.dtype.name != part["dtype"] or blob.size != part["count"]:
      raise ExportError(f"{path}: blob {name!r} is not the {part['count']} {part['dtype']} listed")
  return {name: np.asarray(blobs[name]) for name in parts}


def load_export(
  export_dir: str | os.PathLike, inference: str = "float"
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
  """The student of an export: model, params and manifest; no training state, no teacher.

  Args:
    export_dir: a directory written by `export_student`.
    inference: how the quantized layers compute: 'float' (the fake-quant forward of training,
      which reproduces the student exactly) or 'int8' (the integer path of `quant.int8`, equal
      within float tolerance; its binarized kernels are returned as int8 signs).

  Returns:
    (model, params, manifest): `model.apply({'params': params}, x, t)` is the student's eps
    prediction. Binarized layers get their +-1 kernel as `kernel` and the stored `scale_1`.

  Raises:
    ExportError: no manifest, another format version, a missing/truncated/edited file, or an
      unknown inference mode.
  """
  export_dir = epath.Path(export_dir)
  info = manifest.read(export_dir)
  rows = layout.rows_from_table(info["policy"])
  num_timesteps = info["diffusion"]["num_timesteps"]
  try:
    model = layout.student_model(info["model"], rows, inference, num_timesteps)
  except ValueError as e:
    raise ExportError(f"{export_dir}: {e}") from e
  data = info["data"]
  shapes = param_shapes(model, (data["image_size"], data["image_size"], data["channels"]))
  blobs = _restore_blobs(export_dir / manifest.WEIGHTS, info["parts"])
  try:
    params = layout.unpack(blobs, shapes, rows)
  except ValueError as e:
    raise ExportError(f"{export_dir}: {e}") from e
  params = jax.tree.map(jnp.asarray, params)
  if inference == INT8:
    params = int8_params(params, layout.policy_from_rows(rows, num_timesteps))
  return model, params, info
