"""Writes the 1-bit export of a trained single-basis student (see `layout` and `manifest`)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from binarydm_jax import student, workdir
from binarydm_jax.data import first_stage as first_stage_lib
from binarydm_jax.data.first_stage import FirstStage
from binarydm_jax.models.unet import param_shapes, unet_from_config
from binarydm_jax.quant.params import param_labels, scale_index
from binarydm_jax.quant.policy import unwrap_params
from binarydm_jax.runtime import fileio

from . import layout, manifest
from .manifest import ExportError


def _single_basis(params: Mapping[str, Any], where: str = "") -> dict[str, Any]:
  """`params` without the higher binary bases, which must all be exactly zero."""
  out = {}
  for name, value in params.items():
    path = f"{where}{name}"
    if isinstance(value, Mapping):
      out[name] = _single_basis(value, path + "/")
    elif scale_index(name) is not None and scale_index(name) > 1:
      if np.any(np.asarray(value) != 0):
        raise ExportError(
          f"{path} is nonzero: the student still has two bases; train past the EBB switch "
          "(config.qat.switch_step) so that only one basis is left, then export"
        )
    else:
      out[name] = np.asarray(value)
  return out


def fp_param_count(params: Mapping[str, Any]) -> int:
  """Params of the FP architecture: the student's without binary scales and activation steps."""
  labels = jax.tree.leaves(param_labels(params))
  sizes = [np.size(leaf) for leaf in jax.tree.leaves(params)]
  return sum(
    size for size, label in zip(sizes, labels, strict=True) if label in ("kernel", "other")
  )


def _check_finite(blobs: Mapping[str, np.ndarray], options: Mapping[str, str]) -> None:
  """Refuses non-finite params, naming the dtype option whose range they may have overflowed."""
  for name, blob in blobs.items():
    if blob.dtype.kind == "f" and not np.all(np.isfinite(blob.astype(np.float32))):
      hint = ""
      if name in options and blob.dtype != np.float32:
        hint = f" (overflow in {blob.dtype.name}? use {options[name]} float32)"
      raise ExportError(f"the student's {name!r} params are not all finite{hint}")


def _write_checkpoint(path: epath.Path, blobs: Mapping[str, np.ndarray]) -> None:
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(fileio.absolute(path), dict(blobs))


def _prepare_out_dir(out_dir: epath.Path) -> epath.Path:
  """A fresh temporary directory beside `out_dir`, which may only be absent or an export."""
  if out_dir.exists() and not (out_dir / manifest.MANIFEST).is_file():
    if not out_dir.is_dir() or any(out_dir.iterdir()):
      raise ExportError(f"{out_dir} exists and is not an export; choose another output directory")
  tmp = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}"
  tmp.mkdir(parents=True)
  return tmp


def export_student(
  config: ml_collections.ConfigDict,
  params: Any,
  out_dir: str | os.PathLike,
  *,
  first_stage: FirstStage | None,
  model: nn.Module | None = None,
  fp_dtype: str = "float32",
  quant_dtype: str = "float32",
  step: int | None = None,
) -> dict:
  """Writes a single-basis student as packed sign bits + scales, FP params and manifest.json.

  Takes what a job already holds, so nothing is rebuilt or read from disk again.

  Args:
    config: the job's config.
    params: the student's EMA params (`{'params': ...}` or the inner dict), e.g.
      `state.ema_params` after `qat_stage.train_student`.
    out_dir: the export directory; an earlier export there is replaced.
    first_stage: the job's first stage (`job.first_stage`), whose decoder a latent export ships;
      None in pixel space.
    model: the student UNet of `config` (as `train_student` returns it); built when None.
    fp_dtype: storage of the full-precision params: 'float32' (exact), 'bfloat16' or 'float16'.
    quant_dtype: storage of the binary scales, activation steps/offsets and int weight steps:
      'float32' (exact), 'float16' or 'bfloat16'.
    step: the training step of the params, recorded in the manifest.

  Returns:
    The manifest (also in OUT_DIR/manifest.json).

  Raises:
    ExportError: a two-basis student, an unknown dtype, an occupied out_dir, params that do not
      fit the config's student, or a latent config without its first stage (or the reverse).
  """
  options = {layout.FP: "fp_dtype", layout.QUANT: "quant_dtype"}
  names = {layout.FP: fp_dtype, layout.QUANT: quant_dtype}
  dtypes = {blob: manifest.check_dtype(names[blob], option) for blob, option in options.items()}
  latent = first_stage_lib.autoencoder_config(config) is not None
  if latent != (first_stage is not None):
    raise ExportError(
      "a latent diffusion student needs its first stage (first_stage=job.first_stage)"
      if latent
      else "first_stage was given, but the config has no first stage (pixel space)"
    )
  image_shape = workdir.image_shape(config)
  if model is None:
    model = student.student_model(config, unet_from_config(config.model), image_shape)
  params = _single_basis(jax.device_get(unwrap_params(params)))
  policy = model.layers.policy  # `layers` holds every layer's (path, kernel shape).
  rows = layout.policy_rows([(path, shape, policy.resolve(path)) for path, shape in policy.layers])
  exported = layout.student_model(config.model, rows, num_timesteps=policy.num_timesteps)
  expected = jax.tree.map(lambda a: a.shape, param_shapes(exported, image_shape))
  if jax.tree.map(np.shape, params) != expected:
    raise ExportError("the params do not fit the student of the config; pass the student's params")
  blobs, kernel_bytes = layout.pack(params, rows, dtypes)
  _check_finite(blobs, options)

  out_dir = epath.Path(out_dir)
  tmp = _prepare_out_dir(out_dir)
  try:
    _write_checkpoint(tmp / manifest.WEIGHTS, blobs)
    files = manifest.file_table(tmp, manifest.WEIGHTS)
    extra = {}
    if first_stage is not None:  # Sampling decodes the latents: ship the decoder, in fp_dtype.
      decoder = first_stage_lib.decoder_params(first_stage.params)
      first_stage_lib.save(tmp / manifest.FIRST_STAGE, first_stage.config, decoder, dtype=fp_dtype)
      first_files = manifest.file_table(tmp, manifest.FIRST_STAGE)
      files |= first_files
      extra["first_stage"] = {
        "kind": first_stage.config.kind,
        "dtype": fp_dtype,
        "params": sum(np.size(leaf) for leaf in jax.tree.leaves(decoder)),
        "bytes": sum(entry["bytes"] for entry in first_files.values()),
      }
    written = manifest.write(
      tmp,
      {
        "format": manifest.FORMAT,
        "format_version": manifest.FORMAT_VERSION,
        "model": config.model.to_dict(),
        "data": {"image_size": image_shape[0], "channels": image_shape[2]},
        "diffusion": config.diffusion.to_dict(),
        "sampling": config.sampling.to_dict(),
        "student": student.describe_student(config) | {"step": step},
        "fp_dtype": fp_dtype,
        "quant_dtype": quant_dtype,
        "policy": layout.policy_table(rows, kernel_bytes),
        "parts": {
          name: {"dtype": blob.dtype.name, "count": int(blob.size), "bytes": int(blob.nbytes)}
          for name, blob in blobs.items()
        },
        "fp32_bytes": 4 * fp_param_count(params),
        "packed_bytes": int(blobs[layout.SIGNS].nbytes) if layout.SIGNS in blobs else 0,
        "files": files,
      }
      | extra,
    )
    if out_dir.exists():
      out_dir.rmtree()
    tmp.rename(out_dir)
  finally:
    tmp.rmtree(missing_ok=True)
  return written


def export_student_from_workdir(
  workdir_path: str | os.PathLike,
  out_dir: str | os.PathLike | None = None,
  fp_dtype: str = "float32",
  quant_dtype: str = "float32",
) -> dict:
  """`export_student` of a job's latest student checkpoint into OUT_DIR (default WORKDIR/export).

  Reads the checkpoint (EMA params, its step) and the job's first stage once each.

  Raises:
    ExportError: a workdir without a student checkpoint, or what `export_student` raises.
  """
  try:
    trained = workdir.load_student(workdir_path)
  except workdir.WorkdirError as e:
    raise ExportError(str(e)) from e
  out_dir = out_dir if out_dir is not None else epath.Path(workdir_path) / "export"
  return export_student(
    trained.config,
    trained.params,
    out_dir,
    first_stage=first_stage_lib.from_config(trained.config),
    model=trained.model,
    fp_dtype=fp_dtype,
    quant_dtype=quant_dtype,
    step=trained.step,
  )
