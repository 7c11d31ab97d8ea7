"""Files on workdir paths through etils `epath`: local directories and `gs://` alike.

`epath.Path` hands a local path to `os` and a `gs://` one (also `s3://`, `az://`, `hf://`) to
`tf.io.gfile` (fsspec where TensorFlow is absent); orbax takes the same paths for checkpoints and
`tf.summary` for TensorBoard events. Bytes are built in memory and written in one go (numpy's
`savez` and PIL seek in the file they write, which a `gs://` upload cannot).
"""

from __future__ import annotations

import io
import os

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL (`gs://...`) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path`, made absolute if local (orbax wants absolute paths)."""
  path = epath.Path(path)
  return path if is_remote(path) else path.absolute()


def write_atomic(path: PathLike, data: bytes | str) -> None:
  """Writes `data` to a temp file beside `path` and renames it over `path`.

  A reader never sees a half-written file: the rename is atomic on a local filesystem, and an
  object of `gs://` appears only when its upload completes.
  """
  path = epath.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_bytes(data.encode() if isinstance(data, str) else data)
  tmp.replace(path)


def npz_bytes(**arrays: np.ndarray) -> bytes:
  """The `.npz` file of `np.savez(file, **arrays)`, as bytes."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def load_npz(path: PathLike) -> np.lib.npyio.NpzFile:
  """`np.load` of the `.npz` at `path` (read whole first); use it as a context manager."""
  return np.load(io.BytesIO(epath.Path(path).read_bytes()))
