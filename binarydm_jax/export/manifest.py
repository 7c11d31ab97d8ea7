"""manifest.json of an export: the format, file hashes, the size on disk, and the checks on load.

`export_bytes` is the sum of the sizes (file lengths in bytes, not filesystem blocks) of
every file under the export directory, manifest.json included, except a latent diffusion model's
first stage (FIRST_STAGE/, its own `first_stage.bytes`): the UNet is what the paper's sizes count. The manifest states its own length
that way by being padded with trailing spaces to exactly the length it accounts for (JSON allows
trailing whitespace). `size_saving` = `fp32_bytes` / `export_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath

from binarydm_jax.errors import UserError

MANIFEST = "manifest.json"
WEIGHTS = "weights"  # The orbax checkpoint of the blobs.
FIRST_STAGE = "first_stage"  # Latent diffusion: the autoencoder's decoder (`first_stage.save`).
FORMAT = "binarydm_jax.export"
FORMAT_VERSION = 1
FP_DTYPES = ("float32", "bfloat16", "float16")
_WIDTH = 100  # JSON containers that fit in this many columns are written on one line.
_REEXPORT = "re-export it: python -m binarydm_jax.export --workdir=WORKDIR"


class ExportError(UserError):
  """A student that cannot be exported or an export that cannot be loaded; one line of advice."""


def check_dtype(name: str, option: str = "fp_dtype") -> np.dtype:
  """The numpy dtype of `option=name` (`fp_dtype` or `quant_dtype`: one of FP_DTYPES)."""
  if name not in FP_DTYPES:
    raise ExportError(f"{option}={name!r}: expected one of {', '.join(FP_DTYPES)}")
  return np.dtype(jnp.dtype(name))


def dumps(value: Any, indent: int = 0) -> str:
  """JSON with one line per container that fits in 100 columns (e.g. one line per layer)."""
  flat = json.dumps(value)
  if not isinstance(value, dict | list) or not value or indent + len(flat) <= _WIDTH:
    return flat
  pad = " " * (indent + 2)
  if isinstance(value, dict):
    items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 2)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
  items = [pad + dumps(v, indent + 2) for v in value]
  return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def _files(directory: epath.Path) -> list[epath.Path]:
  """Every file below `directory`, sorted (epath has no recursive glob: `gs://` would list all)."""
  return sorted(root / name for root, _, names in directory.walk() for name in names)


def file_table(directory: str | os.PathLike, under: str) -> dict[str, dict[str, Any]]:
  """{path relative to `directory`: {bytes, sha256}} of every file below `directory/under`."""
  root = epath.Path(directory)
  table = {}
  for path in _files(root / under):
    data = path.read_bytes()
    table[path.relative_to(root).as_posix()] = {
      "bytes": len(data),
      "sha256": hashlib.sha256(data).hexdigest(),
    }
  return table


def write(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
  """Writes OUT_DIR/manifest.json with `export_bytes` and `size_saving` filled in.

  Args:
    out_dir: the export directory, with every other file already written.
    manifest: the manifest, with `fp32_bytes`.

  Returns:
    The manifest as written (JSON types: lists for tuples).
  """
  out_dir = epath.Path(out_dir)
  unet_files = [
    p
    for p in _files(out_dir)
    if p.name != MANIFEST and p.relative_to(out_dir).parts[0] != FIRST_STAGE
  ]
  others = sum(len(p.read_bytes()) for p in unet_files)
  length = 0
  while True:  # The length only grows, so this ends after a few rounds.
    manifest["export_bytes"] = others + length
    manifest["size_saving"] = round(manifest["fp32_bytes"] / manifest["export_bytes"], 3)
    text = (dumps(manifest) + "\n").encode()
    if len(text) <= length:
      break
    length = len(text)
  (out_dir / MANIFEST).write_bytes(text.ljust(length))
  return json.loads(text)


def read(export_dir: str | os.PathLike) -> dict[str, Any]:
  """The manifest of an export, after checking its format version and every file's sha256.

  Raises:
    ExportError: no manifest, another format version, or a missing, truncated or edited file.
  """
  export_dir = epath.Path(export_dir)
  path = export_dir / MANIFEST
  if not path.is_file():
    raise ExportError(
      f"{export_dir} has no {MANIFEST}, so it is not a student export; write one with "
      "python -m binarydm_jax.export --workdir=WORKDIR"
    )
  try:
    manifest = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ExportError(f"{path} is not valid JSON ({e}); {_REEXPORT}") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ExportError(f"{path} is not a {FORMAT} manifest; {_REEXPORT}")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ExportError(
      f"{path}: format_version {version!r}, but this binarydm_jax reads version "
      f"{FORMAT_VERSION}; load it with the version that wrote it, or {_REEXPORT}"
    )
  for name, expected in manifest["files"].items():
    file = export_dir / name
    data = file.read_bytes() if file.is_file() else None
    if data is None:
      problem = "is missing"
    elif len(data) != expected["bytes"]:
      problem = f"has {len(data)} bytes instead of {expected['bytes']} (truncated?)"
    elif hashlib.sha256(data).hexdigest() != expected["sha256"]:
      problem = "does not match its sha256 (edited or corrupted)"
    else:
      continue
    raise ExportError(f"export {export_dir}: file {name} {problem}; {_REEXPORT}")
  return manifest
