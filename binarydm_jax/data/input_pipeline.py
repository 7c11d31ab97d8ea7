"""Training images in host memory, with a step-addressed, restart-exact batch order.

Every dataset is held whole on every host (CIFAR-10 train is 50,000 x 32 x 32 x 3
bytes), so there is no streaming pipeline: `load_dataset` returns an `ImageDataset`
and `ImageDataset.batch(step, ...)` computes the batch for a step purely from
`(seed, step)`. A run restarted from a checkpoint at step `s` therefore sees exactly
the batches an uninterrupted run would have, and every process cuts its own rows out
of the same global batch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np
import sklearn.datasets
from absl import logging
from PIL import Image

from binarydm_jax.data.image_folder import center_square, list_images, read_image_folder
from binarydm_jax.errors import DatasetError
from binarydm_jax.runtime import lazy_imports

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

DATASET_NAMES = ("digits", "cifar10", "folder", "lsun_bedrooms", "lsun_churches", "synthetic")
# Our names of the tensorflow-datasets LSUN categories (the paper's LDM datasets).
LSUN_CATEGORIES = {"lsun_bedrooms": "lsun/bedroom", "lsun_churches": "lsun/church_outdoor"}
# The synthetic images' held-out share (like the other sources' default split).
_SYNTHETIC_HELDOUT = 0.25

# Seeds the train/held-out permutation of digits and image folders. Deliberately
# not the training seed, so the held-out images are the same for every run.
_SPLIT_SEED = 20250125
# Third entropy word of the flip rng, so flips never reuse the order's stream.
_FLIP_STREAM = 0xF11B
# Rows converted from tf.data to numpy at a time while loading CIFAR-10.
_TFDS_CHUNK = 10_000

# (train images, train labels, held-out images, held-out labels); labels may be None.
_Splits = tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]


class DatasetNotFoundError(DatasetError):
  """A dataset is not prepared locally and must be downloaded elsewhere."""


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """Train and held-out images, NHWC float32 in [-1, 1].

  Attributes:
    train: Training images, shape (N, H, W, C).
    heldout: Evaluation reference images, shape (M, H, W, C).
    seed: Seed of the data order and of the random flips.
    random_flip: Whether `batch` flips images horizontally with prob 0.5.
    train_labels: Class labels of `train` (int32), or None.
    heldout_labels: Class labels of `heldout` (int32), or None.
    train_flipped: What a flip of each `train` row gives, when flipping the row itself is not
      exact (latents: the latents of the flipped image); None = flip `train` rows.
  """

  train: np.ndarray
  heldout: np.ndarray
  seed: int
  random_flip: bool
  train_labels: np.ndarray | None = None
  heldout_labels: np.ndarray | None = None
  train_flipped: np.ndarray | None = None

  def batch(
    self,
    step: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> np.ndarray:
    """This process's slice of the global batch for `step`.

    The global batch holds the `global_batch_size` consecutive positions
    starting at `step * global_batch_size` in the endless concatenation of
    per-epoch permutations of the training set; epoch `e` is permuted by
    `np.random.default_rng([seed, e])`. The result depends only on
    `(seed, step)` and the process's place, never on earlier calls.

    Args:
      step: Training step, >= 0.
      global_batch_size: Batch size summed over all processes.
      process_index: This process's index; defaults to `jax.process_index()`.
      process_count: Number of processes; defaults to `jax.process_count()`.

    Returns:
      Rows `[i * B / P, (i + 1) * B / P)` of the global batch, float32 NHWC.

    Raises:
      ValueError: If the batch size is not divisible by the process count,
        or the step or process index is out of range.
    """
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple of "
        f"the process count {process_count}."
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count}).")

    indices = self._global_indices(step, global_batch_size)
    local_size = global_batch_size // process_count
    rows = slice(process_index * local_size, (process_index + 1) * local_size)
    images = self.train[indices[rows]]
    if self.random_flip:
      flip_rng = np.random.default_rng([self.seed, step, _FLIP_STREAM])
      flip = flip_rng.random(global_batch_size)[rows] < 0.5
      if self.train_flipped is None:
        flipped = images[:, :, ::-1]
      else:
        flipped = self.train_flipped[indices[rows]]
      images = np.where(flip[:, None, None, None], flipped, images)
    return images

  def _global_indices(self, step: int, global_batch_size: int) -> np.ndarray:
    """Training-set indices of the global batch for `step`."""
    num_train = len(self.train)
    positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_train)
    indices = np.empty(global_batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
      in_epoch = epochs == epoch
      order = np.random.default_rng([self.seed, int(epoch)]).permutation(num_train)
      indices[in_epoch] = order[offsets[in_epoch]]
    return indices


def load_dataset(data_config: ml_collections.ConfigDict, channels: int = 3) -> ImageDataset:
  """Loads a dataset named by `data_config.name` into host memory.

  Args:
    data_config: Fields `name` (one of DATASET_NAMES), `image_size`, `seed`,
      `random_flip`, and optionally `data_dir` (tfds data dir; for 'folder' the
      image directory), `heldout_fraction` (digits and folder, default 0.2),
      `max_images` (LSUN: read at most this many train images; None = all) and
      `num_images` (synthetic, default 64).
    channels: Channels of the 'folder' images: 1 (grayscale) or 3 (RGB). Digits
      are always 1 channel; CIFAR-10, LSUN and synthetic images 3.

  Returns:
    The dataset, images resized to `image_size` and scaled to [-1, 1].

  Raises:
    ValueError: If the name is unknown.
    DatasetNotFoundError: If CIFAR-10 is not prepared in `data_dir`.
    DatasetError: If the image folder is missing, empty or has an unreadable file.
  """
  name = data_config.name
  image_size = data_config.image_size
  heldout_fraction = data_config.get("heldout_fraction", 0.2)
  if name == "digits":
    splits = _load_digits(image_size, heldout_fraction)
  elif name == "folder":
    splits = _load_folder(data_config.get("data_dir", None), image_size, channels, heldout_fraction)
  elif name == "cifar10":
    splits = _load_cifar10(image_size, data_config.get("data_dir", None))
  elif name in LSUN_CATEGORIES:
    splits = _load_lsun(
      name, image_size, data_config.get("data_dir", None), data_config.get("max_images", None)
    )
  elif name == "synthetic":
    splits = _synthetic(data_config.get("num_images", 64), image_size)
  else:
    raise ValueError(f"Unknown dataset {name!r}; valid names are {', '.join(DATASET_NAMES)}.")
  train, train_labels, heldout, heldout_labels = splits
  logging.info(
    "Loaded %s: train %s, held-out %s, %s, values in [%.2f, %.2f].",
    name,
    train.shape,
    heldout.shape,
    train.dtype,
    train.min(),
    train.max(),
  )
  return ImageDataset(
    train=train,
    heldout=heldout,
    seed=data_config.seed,
    random_flip=data_config.random_flip,
    train_labels=train_labels,
    heldout_labels=heldout_labels,
  )


def check_available(data_config: ml_collections.ConfigDict) -> None:
  """Fails unless `load_dataset(data_config)` finds its images; reads none of them.

  Raises:
    DatasetNotFoundError: CIFAR-10 or LSUN not prepared in `data_dir` (saying how to prepare it).
    DatasetError: a missing or empty image folder.
  """
  name, data_dir = data_config.name, data_config.get("data_dir", None)
  if name == "cifar10" or name in LSUN_CATEGORIES:
    _builder(name, data_dir)
  elif name == "folder":
    list_images(_folder(data_dir))


def _to_model_range(images: np.ndarray, max_value: float, image_size: int) -> np.ndarray:
  """Maps NHWC images in [0, max_value] to float32 [-1, 1], resized bilinearly."""
  scaled = images.astype(np.float32)
  scaled *= 2.0 / max_value
  scaled -= 1.0
  if scaled.shape[1:3] != (image_size, image_size):
    shape = (len(scaled), image_size, image_size, scaled.shape[-1])
    scaled = np.array(jax.image.resize(scaled, shape, method="bilinear"))
  return np.clip(scaled, -1.0, 1.0, out=scaled)


def _split(num_images: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) indices: a permutation fixed by `_SPLIT_SEED`, its first part held out.

  round(heldout_fraction * num_images) images are held out, at least one and at
  most num_images - 1.
  """
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
  order = np.random.default_rng(_SPLIT_SEED).permutation(num_images)
  num_heldout = min(max(int(round(heldout_fraction * num_images)), 1), num_images - 1)
  return order[num_heldout:], order[:num_heldout]


def _load_digits(image_size: int, heldout_fraction: float) -> _Splits:
  """The 1,797 scikit-learn 8x8 digits, split by a fixed permutation."""
  digits = sklearn.datasets.load_digits()
  images = _to_model_range(digits.images[..., None], 16.0, image_size)
  labels = digits.target.astype(np.int32)
  train, heldout = _split(len(images), heldout_fraction)
  return images[train], labels[train], images[heldout], labels[heldout]


def _load_folder(
  directory: str | None, image_size: int, channels: int, heldout_fraction: float
) -> _Splits:
  """Every PNG/JPEG under `directory`, square-cropped; held out as digits are, over sorted paths."""
  images, names = read_image_folder(_folder(directory), image_size, channels)
  if len(images) < 2:
    raise DatasetError(
      f"image folder {directory!r} holds only {names[0]!r}: a train and a held-out split need "
      "at least 2 images; add more"
    )
  train, heldout = _split(len(images), heldout_fraction)
  return (
    _to_model_range(images[train], 255.0, image_size),
    None,
    _to_model_range(images[heldout], 255.0, image_size),
    None,
  )


def _folder(directory: str | None) -> str:
  """The image folder of data.name='folder', which must be given."""
  if not directory:
    raise DatasetError(
      "data.name='folder' needs a directory of PNG/JPEG files: pass --config.data.data_dir=DIR"
    )
  return directory


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of `name` ('cifar10' or a key of LSUN_CATEGORIES)."""
  if name == "cifar10":
    return _prepared_builder("cifar10", "CIFAR-10", data_dir)
  tfds_name = LSUN_CATEGORIES[name]
  return _prepared_builder(tfds_name, f"LSUN {tfds_name.split('/')[1]} ({name})", data_dir)


def _prepared_builder(tfds_name: str, title: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The tfds builder of `tfds_name`, or DatasetNotFoundError saying how to prepare it offline."""
  builder = lazy_imports.tfds().builder(tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    root = builder.data_dir_root
    raise DatasetNotFoundError(
      f"{title} is not prepared in {root} (no dataset_info.json in {builder.data_dir}). "
      'On a machine with internet run `python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{tfds_name}', data_dir='{root}').download_and_prepare()\"` "
      f"(or `tfds build {tfds_name} --data_dir={root}`), copy {root} here, "
      f"then pass --config.data.data_dir={root}."
    )
  return builder


def _load_cifar10(image_size: int, data_dir: str | None) -> _Splits:
  """CIFAR-10 `train` for training and `test` as held-out, from a prepared tfds dir."""
  builder = _builder("cifar10", data_dir)
  train, train_labels = _read_tfds_split(builder, "train")
  heldout, heldout_labels = _read_tfds_split(builder, "test")
  return (
    _to_model_range(train, 255.0, image_size),
    train_labels,
    _to_model_range(heldout, 255.0, image_size),
    heldout_labels,
  )


def _read_tfds_split(
  builder: tfds.core.DatasetBuilder, split: str
) -> tuple[np.ndarray, np.ndarray]:
  """All uint8 images and int32 labels of a split, read in fixed-size chunks."""
  dataset = builder.as_dataset(split=split, shuffle_files=False).batch(_TFDS_CHUNK)
  chunks = list(lazy_imports.tfds().as_numpy(dataset))
  images = np.concatenate([chunk["image"] for chunk in chunks])
  labels = np.concatenate([chunk["label"] for chunk in chunks]).astype(np.int32)
  return images, labels


def _load_lsun(name: str, image_size: int, data_dir: str | None, max_images: int | None) -> _Splits:
  """An LSUN category (`train`, at most `max_images`; `validation` held out), centre-cropped.

  LSUN images differ in size (the shorter side is 256), so each is cropped to its centred
  square and resized one at a time, as the LDM's LSUN loader does.
  """
  builder = _builder(name, data_dir)

  def read(split: str) -> np.ndarray:
    rows = lazy_imports.tfds().as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    images = []
    for row in rows:
      images.append(center_square(Image.fromarray(row["image"]).convert("RGB"), image_size))
      if split == "train" and max_images and len(images) >= max_images:
        break
    return _to_model_range(np.stack(images), 255.0, image_size)

  return read("train"), None, read("validation"), None


def _synthetic(num_images: int, image_size: int) -> _Splits:
  """Smooth random RGB images (sums of a few sinusoids), fixed by `_SPLIT_SEED`: for smoke runs.

  They have image-like low-frequency structure, so an autoencoder and a UNet see non-trivial
  inputs, and they need no download.
  """
  if num_images < 2:
    raise ValueError(
      f"data.num_images must be >= 2 for a train and a held-out split, got {num_images}."
    )
  rng = np.random.default_rng(_SPLIT_SEED)
  grid = np.linspace(0.0, 2.0 * np.pi, image_size, endpoint=False)
  y, x = np.meshgrid(grid, grid, indexing="ij")
  freq = rng.integers(1, 4, size=(num_images, 3, 2, 2))  # image, channel, wave, (fy, fx)
  phase = rng.uniform(0.0, 2.0 * np.pi, size=(num_images, 3, 2))
  waves = np.sin(
    freq[..., 0, None, None] * y + freq[..., 1, None, None] * x + phase[..., None, None]
  )
  images = (0.5 * waves.sum(axis=2)).transpose(0, 2, 3, 1).astype(np.float32)
  images = np.clip(images, -1.0, 1.0)
  train, heldout = _split(num_images, _SYNTHETIC_HELDOUT)
  return images[train], None, images[heldout], None
