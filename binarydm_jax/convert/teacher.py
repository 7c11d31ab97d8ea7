"""The full-precision teacher: load it from a diffusers directory, a hub id or an orbax checkpoint.

`config.teacher.source` names one of
  * an orbax teacher checkpoint written by `save_teacher` (or `python -m binarydm_jax.convert`):
    a directory with the items `params` (the UNet's param tree) and `config` (its `config.model`
    section as JSON); a CheckpointManager root whose latest step holds those items also works;
  * a diffusers `UNet2DModel` directory (`config.json` + `diffusion_pytorch_model.safetensors`),
    converted on the fly by `binarydm_jax.convert.diffusers_unet`;
  * a Hugging Face hub id such as `google/ddpm-cifar10-32` (needs huggingface_hub and network).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from binarydm_jax.errors import TeacherError
from binarydm_jax.models.unet import config_param_shapes
from binarydm_jax.quant import param_labels
from binarydm_jax.runtime import fileio

CIFAR10_HUB_ID = "google/ddpm-cifar10-32"
# The files of a diffusers UNet2DModel that the converter needs (the .bin alternative needs torch).
NEEDED_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
# Fields of `config.model` that change the UNet's params or its function (dropout and dtype don't).
ARCHITECTURE_FIELDS = (
  "channels",
  "ch",
  "ch_mult",
  "num_res_blocks",
  "attn_resolutions",
  "num_head_channels",
  "num_heads",
  "norm_groups",
  "norm_eps",
  "freq_shift",
  "flip_sin_to_cos",
  "downsample_padding",
  "use_scale_shift_norm",
  "resblock_updown",
)
# `unet_from_config`'s values for optional fields, so a config that omits them compares equal.
_OPTIONAL_DEFAULTS = {
  "num_head_channels": -1,
  "num_heads": -1,
  "norm_groups": 32,
  "norm_eps": 1e-6,
  "freq_shift": 1.0,
  "flip_sin_to_cos": False,
  "downsample_padding": "asymmetric",
  "use_scale_shift_norm": False,
  "resblock_updown": False,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def save_teacher(
  path: str | os.PathLike,
  model_config: ml_collections.ConfigDict,
  params: Any,
  overwrite: bool = False,
) -> epath.Path:
  """Writes an orbax teacher checkpoint with the items `params` and `config`.

  Args:
    path: the checkpoint directory to create (local ones are made absolute; `gs://` works).
    model_config: the teacher's `config.model` section (saved as JSON).
    params: the UNet's `params` tree.
    overwrite: replace an existing directory instead of failing.

  Returns:
    The absolute checkpoint path.
  """
  import orbax.checkpoint as ocp

  path = fileio.absolute(path)
  if path.exists() and not overwrite:
    raise TeacherError(f"{path} already exists; remove it or pass overwrite=True (--overwrite)")
  items = ocp.args.Composite(
    params=ocp.args.StandardSave(jax.tree.map(jnp.asarray, params)),
    config=ocp.args.JsonSave(model_config.to_dict()),
  )
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(path, items, force=overwrite)
  return path


def _is_orbax_item_dir(path: epath.Path) -> bool:
  return (path / "config").is_dir() and ((path / "params").is_dir() or (path / "state").is_dir())


def _orbax_item_dir(path: epath.Path) -> epath.Path | None:
  """`path` if it holds orbax teacher items, else its latest step dir that does, else None."""
  if _is_orbax_item_dir(path):
    return path
  steps = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()] if path.is_dir() else []
  for step in sorted(steps, key=lambda p: int(p.name), reverse=True):
    if _is_orbax_item_dir(step):
      return step
  return None


def _load_orbax(path: epath.Path) -> tuple[ml_collections.ConfigDict, Any]:
  """Restores `params` + model `config` (save_teacher), or a training stage's EMA params."""
  import orbax.checkpoint as ocp

  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    config = checkpointer.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    if (path / "params").is_dir():
      model_config = ml_collections.ConfigDict(config)
    else:  # A training stage (checkpointing.save): the full config and the TrainState.
      if "model" not in config:
        raise TeacherError(f"orbax checkpoint {path}: its config has no `model` section")
      model_config = ml_collections.ConfigDict(config["model"])
      model_config.image_size = config.get("data", {}).get("image_size")
    target = config_param_shapes(model_config)
    try:
      if (path / "params").is_dir():
        args = ocp.args.Composite(params=ocp.args.StandardRestore(target))
        params = checkpointer.restore(path, args)["params"]
      else:
        state = checkpointer.restore(path, ocp.args.Composite(state=ocp.args.StandardRestore()))
        params = state["state"]["ema_params"]  # What the stage samples and evaluates with.
        if set(jax.tree.leaves(param_labels(params))) - {"kernel", "other"}:
          raise TeacherError(
            f"orbax checkpoint {path} holds a quantized student (WORKDIR/student), not an FP "
            "teacher; sample it with python -m binarydm_jax.sample --workdir=WORKDIR "
            "--which=student, or export it with python -m binarydm_jax.export --workdir=WORKDIR"
          )
        jax.tree.map(_check_shape, params, target)  # Also checks the tree structure.
    except (ValueError, KeyError, TypeError) as e:
      raise TeacherError(
        f"orbax checkpoint {path}: its params do not match the UNet of its own config ({e})"
      ) from e
  return model_config, params


def _check_shape(value: Any, spec: jax.ShapeDtypeStruct) -> None:
  if value.shape != spec.shape:
    raise ValueError(f"shape {value.shape} instead of {spec.shape}")


def _missing_files_message(source: str, reason: str) -> str:
  repo = source if _HUB_ID.match(source) else CIFAR10_HUB_ID
  return (
    f"teacher source {source!r}: {reason}. To use the DDPM CIFAR-10 teacher offline, download "
    f"{' and '.join(NEEDED_FILES)} from https://huggingface.co/{repo}/tree/main into one "
    f"directory, e.g. teachers/{repo.split('/')[-1]}/, and pass that directory as teacher.source "
    "(or convert it once: python -m binarydm_jax.convert --source=DIR --output=OUT_DIR, "
    "then teacher.source=OUT_DIR)"
  )


def _download(source: str) -> epath.Path:
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:
    raise TeacherError(
      _missing_files_message(source, "no such path, and huggingface_hub is not installed")
    ) from e
  try:
    local = snapshot_download(
      repo_id=source, allow_patterns=[f"{p}{f}" for p in ("", "unet/") for f in NEEDED_FILES]
    )
  except Exception as e:  # noqa: BLE001  (offline, unknown repo, auth: all end in the same advice)
    raise TeacherError(
      _missing_files_message(
        source, f"no such path, and downloading it from the hub failed ({type(e).__name__})"
      )
    ) from e
  return epath.Path(local)


def _local_path(source: str | os.PathLike) -> epath.Path:
  """`source` itself if it exists, else (a hub id) its download into the hub's cache."""
  path = epath.Path(source).expanduser()
  if path.exists():
    return path
  if not _HUB_ID.match(str(source)):
    raise TeacherError(_missing_files_message(str(source), "no such file or directory"))
  return _download(str(source))


def check_source(source: str | os.PathLike) -> None:
  """Fails unless `load_teacher(source)` finds a teacher there; its params are not read.

  A hub id is downloaded here (into the hub's cache, where `load_teacher` finds it again).

  Raises:
    TeacherError: no such path or hub id, or neither an orbax teacher checkpoint nor a diffusers
      UNet2DModel directory there.
  """
  path = _local_path(source)
  if _orbax_item_dir(path) is None:
    from binarydm_jax.convert.diffusers_unet import find_model_dir

    find_model_dir(path)


def load_teacher(source: str | os.PathLike) -> tuple[ml_collections.ConfigDict, Any]:
  """Loads a full-precision teacher UNet.

  Args:
    source: an orbax teacher checkpoint, a diffusers UNet2DModel directory, or (when no such path
      exists) a hub id like "google/ddpm-cifar10-32".

  Returns:
    (model_config, params): the teacher's `config.model` section and its `params` tree (jax arrays
    on the default device), for `unet_from_config(model_config).apply({"params": params}, x, t)`.

  Raises:
    TeacherError: one message naming what is missing or unsupported.
  """
  path = _local_path(source)
  item_dir = _orbax_item_dir(path)
  if item_dir is not None:
    return _load_orbax(fileio.absolute(item_dir))

  from binarydm_jax.convert.diffusers_unet import load_diffusers_unet

  model_config, params = load_diffusers_unet(path)
  return model_config, jax.tree.map(jnp.asarray, params)


def assert_same_architecture(
  model_config: Mapping[str, Any] | ml_collections.ConfigDict,
  teacher_config: Mapping[str, Any] | ml_collections.ConfigDict,
  image_size: int | None = None,
) -> None:
  """Checks that a student `config.model` builds the teacher's UNet (dropout/dtype may differ).

  Args:
    model_config: the run's `config.model`.
    teacher_config: the model config returned by `load_teacher`.
    image_size: the run's resolution (`config.data.image_size`), checked against the teacher's.

  Raises:
    TeacherError: listing every architecture field that differs.
  """

  def get(config, field):
    value = config.get(field, _OPTIONAL_DEFAULTS.get(field))
    return list(value) if isinstance(value, (list, tuple)) else value

  diffs = [
    f"{field}: config {get(model_config, field)!r} vs teacher {get(teacher_config, field)!r}"
    for field in ARCHITECTURE_FIELDS
    if get(model_config, field) != get(teacher_config, field)
  ]
  teacher_size = teacher_config.get("image_size")
  if None not in (image_size, teacher_size) and image_size != teacher_size:
    diffs.append(f"image_size: config {image_size!r} vs teacher {teacher_size!r}")
  if diffs:
    raise TeacherError(
      "config.model does not match the teacher's architecture: " + "; ".join(diffs)
    )
