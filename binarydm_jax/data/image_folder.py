"""A directory of PNG/JPEG files as square uint8 images: listed in a fixed order, resized, cropped.

`read_image_folder` finds every `.png`, `.jpg` and `.jpeg` file under a directory (recursively,
case-insensitive suffixes, symlinked files followed but not symlinked directories), sorts them by
their relative POSIX path (code-point order, so every host lists the same files in the same order),
and decodes each one as `load_image` does: EXIF orientation applied, converted to grayscale or RGB,
the largest centred square resized to `image_size` x `image_size` with PIL's antialiased bicubic
filter (the same as resizing the shorter side to `image_size` and center-cropping, in one
resampling). Paths go through etils `epath`, so a `gs://` folder is read like a local one.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
from absl import logging
from etils import epath
from PIL import Image, ImageOps

from binarydm_jax.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL mode of each supported channel count.
MODES = {1: "L", 3: "RGB"}
# Images decoded between two progress lines in the log.
_LOG_EVERY = 10_000


def list_images(directory: str) -> list[str]:
  """Relative POSIX paths of the PNG/JPEG files under `directory`, sorted.

  Raises:
    DatasetError: If `directory` is not a directory or holds no PNG/JPEG file.
  """
  root = epath.Path(directory)
  if not root.is_dir():
    raise DatasetError(
      f"image folder {directory!r} is not a directory: pass an existing directory of PNG/JPEG "
      "files as --config.data.data_dir"
    )
  names = []
  for parent, _, files in root.walk():
    for file in files:
      if file.lower().endswith(IMAGE_SUFFIXES):
        names.append((parent / file).relative_to(root).as_posix())
  if not names:
    raise DatasetError(
      f"image folder {directory!r} holds no {'/'.join(IMAGE_SUFFIXES)} files (searched "
      "recursively): put the images there or point --config.data.data_dir at their directory"
    )
  return sorted(names)


def center_square(image: Image.Image, image_size: int) -> np.ndarray:
  """The centred square of `image`, resized (bicubic) to uint8 (image_size, image_size, C)."""
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  image = image.resize(
    (image_size, image_size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
  )
  return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, -1)


def load_image(path: str | os.PathLike, image_size: int, channels: int) -> np.ndarray:
  """One image file as uint8 (image_size, image_size, channels): its centred square, resized.

  Raises:
    DatasetError: If the file cannot be decoded (naming it).
  """
  try:
    with epath.Path(path).open("rb") as file, Image.open(file) as image:
      return center_square(ImageOps.exif_transpose(image).convert(MODES[channels]), image_size)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DatasetError(
      f"cannot read image {os.fspath(path)!r} ({message}): remove or replace the file"
    ) from e


def read_image_folder(
  directory: str, image_size: int, channels: int, num_threads: int | None = None
) -> tuple[np.ndarray, list[str]]:
  """All images under `directory` in `list_images` order, as uint8 (N, S, S, channels).

  Args:
    directory: A directory of PNG/JPEG files (local, mounted or `gs://`), searched recursively.
    image_size: Side S of the square output images.
    channels: 1 (grayscale) or 3 (RGB); every image is converted to it.
    num_threads: Decoding threads; None = the CPU count (at most 32).

  Returns:
    The images and their relative paths, in the same order.

  Raises:
    DatasetError: For a missing or empty directory or an unreadable file (one line, naming it).
    ValueError: If `channels` is not 1 or 3.
  """
  if channels not in MODES:
    raise ValueError(f"channels={channels}: an image folder gives 1 (grayscale) or 3 (RGB)")
  names = list_images(directory)
  images = np.empty((len(names), image_size, image_size, channels), np.uint8)
  logging.info("Decoding %d images under %s.", len(names), directory)
  workers = num_threads or min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    paths = (epath.Path(directory) / name for name in names)
    decoded = pool.map(lambda path: load_image(path, image_size, channels), paths)
    try:
      for index, image in enumerate(decoded):
        images[index] = image
        if (index + 1) % _LOG_EVERY == 0:
          logging.info("Decoded %d / %d images.", index + 1, len(names))
    except DatasetError:
      pool.shutdown(cancel_futures=True)  # Do not decode the rest of a folder that failed.
      raise
  return images, names
