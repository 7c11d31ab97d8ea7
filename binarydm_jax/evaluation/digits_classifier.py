"""A small CNN trained on the digits train split, used as an offline FID feature extractor.

InceptionV3 needs downloaded weights and 299px inputs; for the bundled digits
this module instead uses a tiny classifier's 64-wide feature layer as the
feature space for the Frechet distance. At 16px (the digits configs) its params
ship with the package, so a digits-FID means the same on every machine; other
resolutions are trained once (deterministically on one machine, in seconds on a
CPU) and cached. Floating-point differences between CPUs make retrained weights
differ slightly, which is why the extractor's name carries a fingerprint of its
params: two FIDs are comparable when their `feature_extractor` names match.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from binarydm_jax.data import input_pipeline

FEATURE_DIM = 64
_NUM_CLASSES = 10
# Bump when the architecture or training recipe changes, to invalidate caches.
_VERSION = 1
_DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "binarydm_jax")
# Params shipped with the package: trained by `_train` at these resolutions (digits_classifier_*px).
_SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
_TRAIN_SEED = 0
_TRAIN_STEPS = 400
_TRAIN_BATCH_SIZE = 128
_LEARNING_RATE = 3e-3
_EVAL_BATCH_SIZE = 500


class _DigitsCNN(nn.Module):
  """Two conv/pool stages, a 64-wide feature layer and a 10-way linear head.

  Returns the feature layer before its ReLU (units that the ReLU silences on
  all digits still vary there) together with the logits.
  """

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = images
    for features in (16, 32):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    embedding = nn.Dense(FEATURE_DIM, name="feature")(x)
    logits = nn.Dense(_NUM_CLASSES, name="head")(nn.relu(embedding))
    return embedding, logits


class DigitsFeatureExtractor:
  """Features of 1-channel digit images from a cached, deterministically trained CNN.

  The CNN is trained on the train split of the default digits split
  (`heldout_fraction` 0.2), so it never sees the default held-out images.

  Attributes:
    name: Identifies the network, resolution, recipe and exact params, e.g.
      "digits_cnn_v1_16px_0123abcd" (the last part: the first 8 hex digits of their SHA-256).
    image_size: Spatial size (height = width) the network accepts.
  """

  def __init__(self, image_size: int, cache_dir: str | None = None):
    """Loads the shipped classifier for `image_size`, else the cached one, else trains and caches.

    Args:
      image_size: Height and width of the images, as in the data config.
      cache_dir: Where params trained here live; defaults to ~/.cache/binarydm_jax.
    """
    self.image_size = image_size
    self._model = _DigitsCNN()
    self._apply = jax.jit(self._model.apply)
    filename = f"digits_classifier_{image_size}px_v{_VERSION}.msgpack"
    shipped = os.path.join(_SHIPPED_DIR, filename)
    cached = os.path.join(os.path.expanduser(cache_dir or _DEFAULT_CACHE_DIR), filename)
    template = self._model.init(
      jax.random.key(_TRAIN_SEED), jnp.zeros((1, image_size, image_size, 1))
    )["params"]
    path = shipped if os.path.exists(shipped) else cached
    if os.path.exists(path):
      with open(path, "rb") as f:
        payload = f.read()
      self._params = flax.serialization.from_bytes(template, payload)
      action = "Loaded"
    else:
      self._params = self._train(template)
      payload = flax.serialization.to_bytes(self._params)
      _write_atomically(path, payload)
      action = "Trained and cached"
    fingerprint = hashlib.sha256(payload).hexdigest()[:8]
    self.name = f"digits_cnn_v{_VERSION}_{image_size}px_{fingerprint}"
    logging.info("%s digits classifier %s at %s.", action, self.name, path)

  def features(self, images: np.ndarray) -> np.ndarray:
    """Pre-ReLU activations of the 64-wide feature layer.

    Args:
      images: NHWC, C=1, values in [-1, 1], as produced by `load_dataset`.

    Returns:
      Features of shape (N, 64), float64.

    Raises:
      ValueError: If the images are not (N, image_size, image_size, 1).
    """
    return self._run(images)[0]

  def predict(self, images: np.ndarray) -> np.ndarray:
    """The predicted digit (0..9) of each image (NHWC, C=1, values in [-1, 1])."""
    return self._run(images)[1].argmax(axis=-1)

  def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `images` whose predicted class equals `labels`.

    Args:
      images: NHWC, C=1, values in [-1, 1].
      labels: Integer class labels, shape (N,).

    Returns:
      The accuracy in [0, 1].
    """
    return float(np.mean(self.predict(images) == np.asarray(labels)))

  def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits, in fixed-size (padded) batches to compile once."""
    images = np.asarray(images, dtype=np.float32)
    expected = (self.image_size, self.image_size, 1)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(
        f"{self.name} takes images of size {self.image_size}x{self.image_size}x1, "
        f"got shape {images.shape} (size {'x'.join(map(str, images.shape[1:]))})."
      )
    features, logits = [], []
    for start in range(0, len(images), _EVAL_BATCH_SIZE):
      chunk = images[start : start + _EVAL_BATCH_SIZE]
      padded = np.pad(chunk, ((0, _EVAL_BATCH_SIZE - len(chunk)), (0, 0), (0, 0), (0, 0)))
      chunk_features, chunk_logits = self._apply({"params": self._params}, padded)
      features.append(np.asarray(chunk_features, np.float64)[: len(chunk)])
      logits.append(np.asarray(chunk_logits)[: len(chunk)])
    return np.concatenate(features), np.concatenate(logits)

  def _train(self, params: dict) -> dict:
    """Adam on the digits train split: seeded shuffles, fixed step count, no randomness left."""
    config = ml_collections.ConfigDict(
      {"name": "digits", "image_size": self.image_size, "seed": _TRAIN_SEED, "random_flip": False}
    )
    data = input_pipeline.load_dataset(config)
    labels = data.train_labels
    optimizer = optax.adam(_LEARNING_RATE)

    @jax.jit
    def train_step(params, opt_state, images, batch_labels):
      def loss_fn(params):
        logits = self._model.apply({"params": params}, images)[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

      grads = jax.grad(loss_fn)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    order_rng = np.random.default_rng(_TRAIN_SEED)
    steps_per_epoch = len(labels) // _TRAIN_BATCH_SIZE
    for step in range(_TRAIN_STEPS):
      if step % steps_per_epoch == 0:
        order = order_rng.permutation(len(labels))
      start = (step % steps_per_epoch) * _TRAIN_BATCH_SIZE
      rows = order[start : start + _TRAIN_BATCH_SIZE]
      params, opt_state = train_step(params, opt_state, data.train[rows], labels[rows])
    return params


def _write_atomically(path: str, payload: bytes) -> None:
  """Writes `payload` to `path` via a temp file in the same directory and os.replace."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.replace(tmp_path, path)
  except BaseException:
    os.remove(tmp_path)
    raise
