"""DDIM sampling throughput: FP teacher, fake-quant W1A4 student and its int8 export, side by side.

  python -m benchmarks.sampling_throughput --config=configs/digits.py --batch=64 --steps=20
  python -m benchmarks.sampling_throughput --config=configs/cifar.py --batch=64 --steps=2

Builds the config's UNet with random weights (throughput does not depend on their values), the
single-basis student of the config's `quant` section (`head_tail_bases` forced to 1, so every
binary layer has one basis; default W1A4) binarized from it and calibrated on a noise batch, and
that student written as a 1-bit export (`export_student`) and read back with
`load_export(inference='int8')`; the export's size saving is printed too. Each model samples `--batch`
images with a jitted DDIM sampler of `--steps` steps (`diffusion.ddim_sample`, the config's eta and
clipping). After compilation and one warm-up call, `--repeats` rounds alternate between the models,
so machine load hits all alike; the medians are printed as a markdown table with the ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import cpu_model, random_teacher
from binarydm_jax import diffusion, export, quant
from binarydm_jax.models.unet import UNet, unet_from_config

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Model config.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per sampling call.")
_STEPS = flags.DEFINE_integer("steps", 20, "DDIM steps per sampling call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")

MODELS = ("teacher", "fake-quant", "int8")


def make_sampler(model: UNet, config: Any, batch: int, steps: int) -> Callable[..., jax.Array]:
  """A jitted `sample(params, rng) -> images` running the config's DDIM sampler."""
  schedule = diffusion.schedule_from_config(config.diffusion)
  size = config.data.image_size
  shape = (batch, size, size, config.model.channels)

  @jax.jit
  def sample(params: Any, rng: jax.Array) -> jax.Array:
    def eps_fn(x: jax.Array, t: jax.Array) -> jax.Array:
      return model.apply({"params": params}, x, t)

    return diffusion.ddim_sample(
      eps_fn, schedule, shape, rng, steps, config.sampling.eta, config.sampling.clip_denoised
    )

  return sample


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  batch, steps = _BATCH.value, _STEPS.value
  model = unet_from_config(config.model)
  size, channels = config.data.image_size, config.model.channels
  image_shape = (size, size, channels)
  x = jax.random.normal(jax.random.key(1), (2, *image_shape))
  t = jnp.array([100, 700], jnp.int32)
  teacher = random_teacher(model, x, t)

  quant_config = config.quant.copy_and_resolve_references()
  quant_config.head_tail_bases = 1  # Single basis everywhere: the int8 path's domain.
  policy = quant.policy_from_config(quant_config, model, image_shape)
  student = quant.binarize(teacher, policy, (x, t), model=model)
  paths = quant.layer_paths(student)
  int8_layers = sum(quant.runs_int8(policy.resolve(p)) for p in paths)
  export_config = config.copy_and_resolve_references()
  export_config.quant = quant_config
  with tempfile.TemporaryDirectory() as tmp:
    manifest = export.export_student(
      export_config, student, os.path.join(tmp, "export"), first_stage=None
    )
    int8_model, int8_params, _ = export.load_export(os.path.join(tmp, "export"), "int8")

  models = {
    "teacher": (model, teacher),
    "fake-quant": (quant.with_policy(model, policy), student),
    "int8": (int8_model, int8_params),
  }
  samplers = {name: make_sampler(m, config, batch, steps) for name, (m, _) in models.items()}
  rng = jax.random.key(0)
  for name, (_, params) in models.items():  # Compile and warm up.
    jax.block_until_ready(samplers[name](params, rng))

  times: dict[str, list[float]] = {name: [] for name in models}
  for _ in range(_REPEATS.value):
    for name, (_, params) in models.items():
      start = time.perf_counter()
      jax.block_until_ready(samplers[name](params, rng))
      times[name].append(time.perf_counter() - start)
  median = {name: statistics.median(v) for name, v in times.items()}
  per_s = {name: batch / m for name, m in median.items()}

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  device = jax.devices()[0].device_kind
  print(
    f"{device} ({cpu_model()}, {cores} of {os.cpu_count()} cores usable); jax {jax.__version__}; "
    f"{config.model.ch}ch UNet at {size}x{size}x{channels}, batch {batch}, DDIM {steps} steps, "
    f"{_REPEATS.value} interleaved repeats (median); student {quant_config.preset} single basis, "
    f"{int8_layers} of {len(paths)} layers in int8; its export: {manifest['export_bytes']:,} "
    f"bytes on disk, size_saving {manifest['size_saving']}x"
  )
  print()
  print("| model | s / batch | images/s | vs fake-quant | vs teacher |")
  print("|---|---|---|---|---|")
  for name in models:
    print(
      f"| {name} | {median[name]:.2f} | {per_s[name]:.1f} | "
      f"{per_s[name] / per_s['fake-quant']:.2f} | {per_s[name] / per_s['teacher']:.2f} |"
    )
  if _JSON.value:
    result = {
      "device": device,
      "cpu": cpu_model(),
      "cores_usable": cores,
      "jax": jax.__version__,
      "model": {"ch": config.model.ch, "image_size": size, "channels": channels},
      "preset": quant_config.preset,
      "int8_layers": int8_layers,
      "export_bytes": manifest["export_bytes"],
      "size_saving": manifest["size_saving"],
      "layers": len(paths),
      "batch": batch,
      "steps": steps,
      "seconds_per_batch": median,
      "images_per_s": per_s,
      "times_s": times,
    }
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
