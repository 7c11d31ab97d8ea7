"""Tests for data.name='folder': PNG/JPEG files listed, center-cropped, split and loaded."""

import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from binarydm_jax.data import image_folder, input_pipeline
from binarydm_jax.errors import ConfigError, DatasetError
from binarydm_jax.training.config_validation import validate_config
from configs import digits

SIZE = 8
RED, GREEN = (255, 0, 0), (0, 255, 0)
# Relative path -> (height, width, mode or None for the banded landscape image).
FILES = {
  "band.png": (24, 48, None),  # Red left and right thirds, green centre square.
  "flat.png": (16, 16, "RGB"),  # Constant (51, 102, 204).
  "gray.png": (12, 20, "L"),  # Grayscale, constant 128.
  "sub/deeper/tall.JPG": (36, 20, "RGB"),  # Portrait JPEG in a nested folder, upper-case suffix.
  "sub/wide.jpeg": (10, 30, "RGB"),
}


def _write(root: pathlib.Path, name: str) -> None:
  height, width, mode = FILES[name]
  path = root / name
  path.parent.mkdir(parents=True, exist_ok=True)
  if mode is None:
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = RED
    pixels[:, width // 4 : width - width // 4] = GREEN
    Image.fromarray(pixels).save(path)
  elif name == "flat.png":
    Image.new("RGB", (width, height), (51, 102, 204)).save(path)
  elif mode == "L":
    Image.new("L", (width, height), 128).save(path)
  else:
    pixels = np.random.default_rng(len(name)).integers(0, 256, (height, width, 3), np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _make_folder(root: pathlib.Path, order=tuple(FILES)) -> pathlib.Path:
  for name in order:
    _write(root, name)
  (root / "notes.txt").write_text("not an image")
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _make_folder(tmp_path_factory.mktemp("images"))


def _config(data_dir, **overrides) -> ml_collections.ConfigDict:
  config = {
    "name": "folder",
    "data_dir": None if data_dir is None else str(data_dir),
    "image_size": SIZE,
    "seed": 0,
    "random_flip": False,
    "heldout_fraction": 0.2,
  }
  return ml_collections.ConfigDict({**config, **overrides})


def test_lists_images_recursively_in_code_point_order(folder):
  assert image_folder.list_images(str(folder)) == [
    "band.png",
    "flat.png",
    "gray.png",
    "sub/deeper/tall.JPG",
    "sub/wide.jpeg",
  ]


@pytest.mark.parametrize("channels", [1, 3])
def test_dataset_layout_range_and_split(folder, channels):
  data = input_pipeline.load_dataset(_config(folder), channels=channels)
  assert data.train.shape == (4, SIZE, SIZE, channels)  # round(0.2 * 5) = 1 held out.
  assert data.heldout.shape == (1, SIZE, SIZE, channels)
  assert data.train.dtype == data.heldout.dtype == np.float32
  assert data.train_labels is None and data.heldout_labels is None
  both = np.concatenate([data.train, data.heldout])
  assert -1.0 <= both.min() < -0.25 and 0.25 < both.max() <= 1.0
  # Train and held-out partition the folder: every image exactly once, at x / 127.5 - 1.
  uint8, _ = image_folder.read_image_folder(str(folder), SIZE, channels)
  back = np.round((both + 1.0) * 127.5).astype(np.uint8)
  assert sorted(map(bytes, back)) == sorted(map(bytes, uint8))
  assert data.batch(3, 4, process_index=0, process_count=1).shape == (4, SIZE, SIZE, channels)


def test_values_map_0_255_to_minus_1_1(folder):
  flat = image_folder.load_image(folder / "flat.png", SIZE, 3)
  np.testing.assert_array_equal(flat, np.broadcast_to([51, 102, 204], (SIZE, SIZE, 3)))
  data = input_pipeline.load_dataset(_config(folder, heldout_fraction=0.5))
  expected = np.array([51, 102, 204], np.float32) / 127.5 - 1.0
  both = np.concatenate([data.train, data.heldout])
  assert sum(np.allclose(x, expected, atol=1e-6) for x in both) == 1


def test_center_crop_keeps_the_centre_square(folder):
  """The banded 48x24 image's centred 24x24 square is green; its outer thirds are red."""
  image = image_folder.load_image(folder / "band.png", SIZE, 3).astype(int)
  np.testing.assert_array_equal(image[:, 1:-1], np.broadcast_to(GREEN, (SIZE, SIZE - 2, 3)))
  # The outermost columns feel the red just outside the square only through the bicubic support.
  assert image[..., 1].min() > 200 and image[..., 0].max() < 40
  # Squashing instead of cropping would have made the left and right quarters red.
  squashed = np.asarray(Image.open(folder / "band.png").resize((SIZE, SIZE)))
  assert squashed[:, 0, 0].min() > 200


def test_grayscale_and_rgb_conversions(folder):
  gray = image_folder.load_image(folder / "gray.png", SIZE, 3)
  np.testing.assert_array_equal(gray, np.full((SIZE, SIZE, 3), 128))
  tall_rgb = image_folder.load_image(folder / "sub/deeper/tall.JPG", SIZE, 3)
  tall_gray = image_folder.load_image(folder / "sub/deeper/tall.JPG", SIZE, 1)
  assert tall_rgb.shape == (SIZE, SIZE, 3) and tall_gray.shape == (SIZE, SIZE, 1)
  luma = tall_rgb.astype(float) @ [0.299, 0.587, 0.114]  # PIL's L conversion (ITU-R 601-2)
  np.testing.assert_allclose(tall_gray[..., 0], luma, atol=3)


def test_same_images_in_another_folder_give_the_same_dataset(folder, tmp_path):
  """Order and split depend on the relative paths only, not on creation order or location."""
  other = _make_folder(tmp_path / "copy", order=tuple(reversed(FILES)))
  first = input_pipeline.load_dataset(_config(folder))
  second = input_pipeline.load_dataset(_config(other))
  np.testing.assert_array_equal(first.train, second.train)
  np.testing.assert_array_equal(first.heldout, second.heldout)
  np.testing.assert_array_equal(first.batch(5, 4, 0, 1), second.batch(5, 4, 0, 1))


def _one_line_error(exc_type, call, *fragments):
  with pytest.raises(exc_type) as error:
    call()
  message = str(error.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message


def test_missing_and_empty_folders(tmp_path):
  missing = tmp_path / "nowhere"
  _one_line_error(
    DatasetError,
    lambda: input_pipeline.load_dataset(_config(missing)),
    str(missing),
    "not a directory",
    "--config.data.data_dir",
  )
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
  _one_line_error(
    DatasetError,
    lambda: input_pipeline.load_dataset(_config(tmp_path / "empty")),
    "holds no .png/.jpg/.jpeg files",
    "--config.data.data_dir",
  )
  _one_line_error(
    DatasetError,
    lambda: input_pipeline.load_dataset(_config(None)),
    "--config.data.data_dir=DIR",
  )
  _write(tmp_path / "single", "flat.png")
  _one_line_error(
    DatasetError,
    lambda: input_pipeline.load_dataset(_config(tmp_path / "single")),
    "'flat.png'",
    "at least 2 images",
  )


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_file_is_named(folder, tmp_path, damage):
  bad = tmp_path / "bad"
  for name in FILES:
    _write(bad, name)
  target = bad / "sub" / "wide.jpeg"
  payload = target.read_bytes()
  target.write_bytes(b"not a jpeg" if damage == "garbage" else payload[: len(payload) // 2])
  _one_line_error(
    DatasetError,
    lambda: input_pipeline.load_dataset(_config(bad)),
    f"cannot read image {str(target)!r}",
    "remove or replace the file",
  )


def test_config_validation_of_folder_source(folder):
  config = digits.get_config()
  config.data.name = "folder"
  config.data.data_dir = str(folder)
  config.eval.metric = "none"
  validate_config(config)  # digits' model.channels = 1: grayscale images.
  config.model.channels = 3
  validate_config(config)
  config.model.channels = 4
  _one_line_error(ConfigError, lambda: validate_config(config), "config.model.channels=4", "(RGB)")
  config.model.channels = 3
  config.data.data_dir = None
  _one_line_error(
    ConfigError, lambda: validate_config(config), "config.data.data_dir=None", "PNG/JPEG"
  )
  config.data.name = "lsun"
  _one_line_error(
    ConfigError, lambda: validate_config(config), "config.data.name='lsun'", "'folder'"
  )
