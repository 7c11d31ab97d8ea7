"""QAT step time over FP train step time at the same batch, measured side by side in one run.

  python -m benchmarks.qat_step_cost [--config=configs/digits.py] [--batch_size=64]
      [--repeats=5] [--steps_per_repeat=5] [--noise_data] [--json=out.json]

Times the library's own jitted steps on the config's model and data: the FP teacher step
(`fp_stage.make_train_step`) and the QAT step (`qat_stage.make_student`) of `baseline` (single basis, no
teacher forward) and `binarydm` (EBB in the head/tail, plus the teacher forward and the LRM loss),
at the config's `quant.preset`. After compilation and warm-up, `--repeats` rounds alternate
between the steps (so machine load hits all alike); the medians of the per-step times and their
ratios to the FP step are printed as a markdown table. `--noise_data` times the same steps on
uniform noise images of the config's shape instead of its dataset (step time does not depend on
pixel values), e.g. for CIFAR-10 on a machine where the dataset is not prepared.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import write_json
from binarydm_jax import diffusion
from binarydm_jax.data.input_pipeline import ImageDataset, load_dataset
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.runtime import sharding
from binarydm_jax.training import fp_stage, qat_stage

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Model and data config.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Batch of every step (default: qat.batch_size).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")
_STEPS = flags.DEFINE_integer("steps_per_repeat", 5, "Steps timed per round and variant.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per variant after compilation.")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
_NOISE = flags.DEFINE_bool("noise_data", False, "Uniform noise images instead of the dataset.")

# Images of the noise dataset: enough for the LRM projection's calibration batches.
_NOISE_IMAGES = 1024


def noise_dataset(config) -> ImageDataset:
  """Uniform noise in [-1, 1] shaped as the config's images (seeded by `data.seed`)."""
  size, channels = config.data.image_size, config.model.channels
  rng = np.random.default_rng(config.data.seed)
  images = rng.uniform(-1, 1, (_NOISE_IMAGES, size, size, channels)).astype(np.float32)
  return ImageDataset(train=images, heldout=images[:64], seed=config.data.seed, random_flip=False)


def fp_step(config, mesh, dataset, model, schedule):
  """The FP train step on a fresh state; returns (advance(batch), teacher params)."""
  state, step = fp_stage.make_teacher(config, mesh, model, schedule, dataset.train.shape[1:])
  holder = {"state": state}

  def advance(batch):
    holder["state"], metrics = step(holder["state"], batch)
    return metrics

  return advance, jax.tree.map(jnp.copy, state.params)  # The state's own buffers are donated.


def qat_step(config, method, mesh, dataset, model, teacher_params, schedule):
  """The QAT step of `method` (qat.method) starting from `teacher_params`; returns advance(batch)."""
  config = config.copy_and_resolve_references()
  config.qat.method = method
  student = qat_stage.make_student(config, mesh, dataset, model, teacher_params, schedule)
  holder = {"state": student.state}

  def advance(batch):
    holder["state"], metrics = student.step(holder["state"], teacher_params, batch)
    return metrics

  return advance


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  batch_size = _BATCH.value or config.qat.batch_size
  config.qat.batch_size = config.training.batch_size = batch_size
  mesh = sharding.make_mesh(config.mesh)
  dataset = noise_dataset(config) if _NOISE.value else load_dataset(config.data)
  schedule = diffusion.schedule_from_config(config.diffusion)
  model = unet_from_config(config.model)
  batch = sharding.global_batch(dataset.batch(0, batch_size), mesh)

  fp, teacher_params = fp_step(config, mesh, dataset, model, schedule)
  steps = {
    "fp": fp,
    "baseline": qat_step(config, "baseline", mesh, dataset, model, teacher_params, schedule),
    "binarydm": qat_step(config, "binarydm", mesh, dataset, model, teacher_params, schedule),
  }
  for advance in steps.values():  # Compile and warm up.
    for _ in range(_WARMUP.value + 1):
      jax.block_until_ready(advance(batch))

  times = {name: [] for name in steps}
  for _ in range(_REPEATS.value):
    for name, advance in steps.items():
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        metrics = advance(batch)
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - start) / _STEPS.value)
  median = {name: statistics.median(t) for name, t in times.items()}
  result = {
    "config": {"image_size": config.data.image_size, "ch": config.model.ch},
    "preset": config.quant.preset,
    "data": "noise" if _NOISE.value else config.data.name,
    "batch_size": batch_size,
    "ms_per_step": {name: 1e3 * m for name, m in median.items()},
    "ratio_over_fp": {name: m / median["fp"] for name, m in median.items()},
    "times_s": times,
    "cpu_cores": os.cpu_count(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
  }
  print(f"| step ({config.quant.preset}, batch {batch_size}) | ms/step | over FP |")
  print("|---|---|---|")
  for name in steps:
    print(f"| {name} | {1e3 * median[name]:.0f} | {median[name] / median['fp']:.2f} |")
  write_json(_JSON.value, result)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
