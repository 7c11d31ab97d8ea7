"""TensorFlow and the libraries that import it, imported on first use only.

TensorFlow takes seconds to import and is needed for two things: reading CIFAR-10 / LSUN with
tfds, and the TensorBoard event files of clu's metric writers (`clu.metric_writers` imports it at
import time). The package reaches them only through these functions, so that a command that
uses neither (`--help`, sampling, scoring, exporting) never imports TensorFlow; its C++ start-up
logs are silenced by the package (`binarydm_jax/__init__.py`).
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def tensorflow() -> ModuleType:
  """TensorFlow, with any GPU hidden from it: it only reads data, the accelerators are JAX's."""
  import tensorflow as tf

  if tf.config.list_physical_devices("GPU"):
    tf.config.set_visible_devices([], "GPU")
  return tf


def tfds() -> ModuleType:
  """`tensorflow_datasets` (its builders import TensorFlow)."""
  tensorflow()
  import tensorflow_datasets

  return tensorflow_datasets


def metric_writers() -> ModuleType:
  """`clu.metric_writers` (TensorBoard event files)."""
  tensorflow()
  from clu import metric_writers as writers

  return writers


def periodic_actions() -> ModuleType:
  """`clu.periodic_actions` (it imports `clu.metric_writers`)."""
  tensorflow()
  from clu import periodic_actions as actions

  return actions
