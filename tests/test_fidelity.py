"""The paired fidelity measure: its numbers by hand, the SQNR table against numpy, and the command."""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from benchmarks.common import random_teacher
from binarydm_jax import workdir
from binarydm_jax.evaluation import fidelity
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.quant import QuantConv, calibrate
from binarydm_jax.quant.activations import timestep_scope
from binarydm_jax.quant.policy import QuantPolicy, QuantRule
from binarydm_jax.training.train_state import create_train_state
from tests.test_export import random_student, save_stage, student_state, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_image_fidelity_by_hand():
  teacher = np.full((4, 2, 2, 1), -1.0)
  teacher[0] = 0.5
  student = teacher + 0.1
  result = fidelity.image_fidelity(teacher, student)
  np.testing.assert_allclose(result["mse"], 0.01)
  np.testing.assert_allclose(result["psnr"], 10 * np.log10(4 / 0.01))
  np.testing.assert_allclose(result["mean_bias"], 0.1)
  assert result["background"] == {"teacher": 0.75, "student": 0.0}  # -0.9 is no background.
  assert result["label_agreement"] is None and result["num"] == 4
  assert len(result["per_image_mse"]) == 4


def test_label_agreement_counts_equal_digits():
  classifier = fidelity.digits_classifier((16, 16, 1))
  images = np.asarray(jax.random.uniform(jax.random.key(0), (8, 16, 16, 1), minval=-1, maxval=1))
  assert fidelity.image_fidelity(images, images, classifier)["label_agreement"] == 1.0
  labels = classifier.predict(images)
  flipped = images.copy()
  flipped[:4] = -1.0  # Blank images: one label for all four.
  agreement = fidelity.image_fidelity(images, flipped, classifier)["label_agreement"]
  expected = (4 + np.sum(labels[:4] == classifier.predict(flipped[:1])[0])) / 8
  assert agreement == expected
  assert fidelity.digits_classifier((32, 32, 3)) is None


def test_pairs_grid_puts_each_student_row_under_its_teacher_row():
  teacher = -np.ones((3, 16, 16, 1))
  student = np.ones((3, 16, 16, 1))
  grid = fidelity.pairs_grid(teacher, student, columns=2)
  cell = 64 + 1  # Enlarged 4x to 64 px, 1 px borders.
  assert grid.shape == (1 + 4 * cell, 1 + 2 * cell, 1)
  assert grid[1, 1, 0] == 0 and grid[1 + cell, 1, 0] == 255  # Teacher black, student white.


class OneLayer(nn.Module):
  """A single quantized conv called as a UNet is: (x, t)."""

  policy: QuantPolicy

  @nn.compact
  def __call__(self, x, t):
    with timestep_scope(t):
      return QuantConv(3, policy=self.policy, name="conv")(x)


def test_sqnr_table_against_numpy():
  policy = QuantPolicy((QuantRule(".*", treatment="fp", act_bits=4, act_t_groups=2),))
  model = OneLayer(policy)
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 2)) * jnp.arange(1, 9)[:, None, None, None]
  t = jnp.array([0, 100, 200, 300, 600, 700, 800, 999])
  params = model.init(jax.random.key(1), x, t)["params"]
  params = calibrate(model, params, x, t)
  table = fidelity.sqnr_table(model, params, x, t, groups=2, num_timesteps=1000, batch_size=3)
  step = np.asarray(params["conv"]["act_step"])[:, 0]
  for g, rows in enumerate((slice(0, 4), slice(4, 8))):
    xs = np.asarray(x[rows], np.float64)
    q = np.clip(np.round(xs / step[g]), -8, 7) * step[g]
    expected = 10 * np.log10(np.sum(xs**2) / np.sum((xs - q) ** 2))
    np.testing.assert_allclose(table["layers"]["conv"][g], expected, rtol=1e-4)
  assert table["groups"] == [[0, 500], [500, 1000]]
  assert table["by_kind"]["conv"] == table["layers"]["conv"]
  assert "| conv |" in fidelity.format_sqnr(table)


def test_the_fidelity_command_on_a_workdir(tmp_path):
  """Teacher and student of a workdir, 8 paired samples: the JSON, the printed line, the PNG."""
  config = tiny_config()
  x = jnp.zeros((1, *workdir.image_shape(config)))
  teacher = random_teacher(unet_from_config(config.model), x, jnp.zeros((1,), jnp.int32))
  state = create_train_state(teacher, optax.adam(1e-3), jax.random.PRNGKey(0))
  save_stage(tmp_path / "teacher", config, state, 5)
  save_stage(tmp_path / "student", config, student_state(random_student(config)), 7)
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "binarydm_jax.fidelity",
      f"--workdir={tmp_path}",
      "--num=8",
      "--batch_size=8",
      "--sqnr_images=2",
      "--sqnr_groups=2",
      f"--json={tmp_path}/f.json",
      f"--out={tmp_path}/pairs.png",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads((tmp_path / "f.json").read_text())
  assert result["num"] == 8 and len(result["per_image_mse"]) == 8
  assert result["psnr"] == fidelity.psnr(result["mse"])
  assert result["label_agreement"] is None  # 8 px images: no digits classifier.
  assert set(result["sqnr"]["by_kind"]) >= {"conv_1", "conv_2", "skip"}
  assert "paired samples: PSNR" in out.stdout and "| conv_1 |" in out.stdout
  assert Image.open(tmp_path / "pairs.png").size[0] >= 8 * 64
