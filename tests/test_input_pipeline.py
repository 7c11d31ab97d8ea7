"""Tests for input_pipeline: step-addressed batches, digits split, CIFAR-10 loading."""

import socket

import ml_collections
import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds

from binarydm_jax.data import input_pipeline

NUM_TOY = 10


def _toy_dataset(seed: int = 0, random_flip: bool = False) -> input_pipeline.ImageDataset:
  """Image i has left column i and right column i + 0.5, so index and flip are readable."""
  columns = np.stack([np.arange(NUM_TOY), np.arange(NUM_TOY) + 0.5], axis=-1)
  images = np.repeat(columns[:, None, :, None], 2, axis=1).astype(np.float32)
  return input_pipeline.ImageDataset(
    train=images, heldout=images[:2], seed=seed, random_flip=random_flip
  )


def _indices(batch: np.ndarray) -> np.ndarray:
  """Training-set index of each toy image."""
  return np.floor(batch.min(axis=(1, 2, 3))).astype(int)


def _is_flipped(batch: np.ndarray) -> np.ndarray:
  """Whether each toy image is mirrored (right column smaller than left)."""
  return batch[:, 0, 0, 0] > batch[:, 0, -1, 0]


def _config(**overrides) -> ml_collections.ConfigDict:
  """A data config for 16px digits, with `overrides` applied."""
  config = {"name": "digits", "image_size": 16, "seed": 0, "random_flip": False}
  return ml_collections.ConfigDict({**config, **overrides})


@pytest.fixture(scope="module")
def digits():
  return input_pipeline.load_dataset(_config())


def test_same_step_gives_same_batch():
  first, second = _toy_dataset(), _toy_dataset()
  np.testing.assert_array_equal(first.batch(7, 4, 0, 1), first.batch(7, 4, 0, 1))
  np.testing.assert_array_equal(first.batch(7, 4, 0, 1), second.batch(7, 4, 0, 1))


@pytest.mark.parametrize("random_flip", [False, True])
def test_process_slices_concatenate_to_global_batch(random_flip):
  data = _toy_dataset(random_flip=random_flip)
  for step in range(6):
    whole = data.batch(step, 6, process_index=0, process_count=1)
    halves = [data.batch(step, 6, process_index=i, process_count=2) for i in range(2)]
    assert halves[0].shape == (3, 2, 2, 1)
    np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_restart_gives_the_batches_of_an_uninterrupted_run():
  uninterrupted = [_toy_dataset(seed=3).batch(s, 4, 0, 1) for s in range(12)]
  restarted = _toy_dataset(seed=3)
  for step in reversed(range(5, 12)):
    np.testing.assert_array_equal(restarted.batch(step, 4, 0, 1), uninterrupted[step])


def test_different_steps_and_seeds_differ():
  data = _toy_dataset()
  assert not np.array_equal(data.batch(0, 4, 0, 1), data.batch(1, 4, 0, 1))
  assert not np.array_equal(data.batch(0, 4, 0, 1), _toy_dataset(seed=1).batch(0, 4, 0, 1))


def test_every_epoch_is_a_permutation_across_wrapping_batches():
  data = _toy_dataset()
  # Batch size 4 does not divide 10, so steps 2, 4, 7, ... straddle epochs.
  stream = np.concatenate([_indices(data.batch(s, 4, 0, 1)) for s in range(15)])
  epochs = stream.reshape(6, NUM_TOY)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(NUM_TOY))
  assert len({tuple(epoch) for epoch in epochs}) > 1


def test_batch_larger_than_dataset_spans_several_epochs():
  stream = _indices(_toy_dataset().batch(1, 25, 0, 1))  # positions 25..49
  np.testing.assert_array_equal(np.sort(stream[5:15]), np.arange(NUM_TOY))


def test_random_flip_mirrors_some_images():
  flipped = _toy_dataset(random_flip=True)
  plain = _toy_dataset(random_flip=False)
  flags = []
  for step in range(10):
    batch = flipped.batch(step, 8, 0, 1)
    reference = plain.batch(step, 8, 0, 1)
    flip = _is_flipped(batch)
    np.testing.assert_array_equal(batch[flip], reference[flip][:, :, ::-1])
    np.testing.assert_array_equal(batch[~flip], reference[~flip])
    flags.append(flip)
  assert 0.25 < np.mean(flags) < 0.75


def test_indivisible_batch_size_raises():
  with pytest.raises(ValueError, match="multiple of the process count 4"):
    _toy_dataset().batch(0, 6, process_index=0, process_count=4)


def test_digits_split_partitions_all_images():
  data = input_pipeline.load_dataset(_config(image_size=8))
  assert len(data.train) + len(data.heldout) == 1797
  assert len(data.heldout) == round(0.2 * 1797)
  digits = sklearn.datasets.load_digits()
  combined = np.concatenate([data.train, data.heldout]).reshape(1797, -1)
  expected = (digits.images / 8.0 - 1.0).reshape(1797, -1)
  np.testing.assert_allclose(
    combined[np.lexsort(combined.T)], expected[np.lexsort(expected.T)], atol=1e-6
  )
  labels = np.concatenate([data.train_labels, data.heldout_labels])
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(digits.target))


def test_digits_resized_range_and_labels(digits):
  assert digits.train.shape == (1438, 16, 16, 1)
  assert digits.heldout.shape == (359, 16, 16, 1)
  assert digits.train.dtype == np.float32
  assert digits.train.min() == -1.0 and digits.train.max() <= 1.0
  assert digits.train_labels.dtype == np.int32
  assert digits.heldout_labels.shape == (359,)


def test_digits_heldout_does_not_depend_on_training_seed(digits):
  other = input_pipeline.load_dataset(_config(seed=123, random_flip=True))
  np.testing.assert_array_equal(other.heldout, digits.heldout)
  np.testing.assert_array_equal(other.heldout_labels, digits.heldout_labels)
  assert other.seed == 123 and other.random_flip


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="digits, cifar10"):
    input_pipeline.load_dataset(_config(name="mnist"))


@pytest.mark.parametrize("image_size", [32, 16])
def test_cifar10_from_mocked_tfds(tmp_path, image_size):
  builder = tfds.builder("cifar10", data_dir=str(tmp_path))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)  # metadata only: counts as prepared
  config = _config(name="cifar10", image_size=image_size, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
    data = input_pipeline.load_dataset(config)
  assert data.train.shape == (6, image_size, image_size, 3)
  assert data.heldout.shape == (6, image_size, image_size, 3)
  assert data.train.dtype == np.float32
  assert -1.0 <= data.train.min() < data.train.max() <= 1.0
  assert data.train_labels.dtype == np.int32


def test_cifar10_not_prepared_raises_without_downloading(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("load_dataset tried to download.")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
  monkeypatch.setattr(socket.socket, "connect", no_network)
  config = _config(name="cifar10", data_dir=str(tmp_path))
  with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
    input_pipeline.load_dataset(config)
  message = str(error.value)
  assert f"--config.data.data_dir={tmp_path}" in message
  assert "download_and_prepare()" in message
  assert list(tmp_path.iterdir()) == []
