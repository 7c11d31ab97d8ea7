"""benchmarks/device_benchmarks.sh's pieces: the import-only stand-ins and the noise dataset."""

import pathlib
import subprocess
import sys

import numpy as np

from benchmarks import qat_step_cost
from configs import cifar

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_noise_data_has_the_configs_image_shape_and_range():
  config = cifar.get_config()
  first, second = qat_step_cost.noise_dataset(config), qat_step_cost.noise_dataset(config)
  assert first.train.shape == (1024, 32, 32, 3) and first.train.dtype == np.float32
  assert -1 <= first.train.min() < -0.99 and 0.99 < first.train.max() <= 1
  np.testing.assert_array_equal(first.train, second.train)  # Seeded by data.seed.
  assert first.heldout.shape[1:] == first.train.shape[1:]


def test_stand_in_lets_clu_import_without_tensorflow(tmp_path):
  """The script's stand-in, put first on the path, serves clu's module-level TensorFlow use."""
  script = (ROOT / "benchmarks" / "device_benchmarks.sh").read_text()
  stand_in = script.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
  (tmp_path / "tensorflow").mkdir()
  (tmp_path / "tensorflow" / "__init__.py").write_text(stand_in)
  check = (
    "import tensorflow as tf\n"
    f"assert tf.__file__.startswith({str(tmp_path)!r})\n"
    "from clu import metric_writers\n"
    "class Callback(tf.keras.callbacks.Callback): pass\n"
    "assert type(tf.make_tensor_proto(0)).FromString(b'') is not None\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", check],
    env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
