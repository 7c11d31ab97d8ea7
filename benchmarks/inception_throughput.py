"""FID Inception feature extraction: our Flax InceptionV3 against torch-fidelity's, side by side.

  python -m benchmarks.inception_throughput --batch=64 --repeats=5 [--json=OUT.json]
  python -m benchmarks.inception_throughput --generate_and_score=1000 --steps=100

Both networks run the same random weights (`tests/torch_fidelity_compat.random_inception`: the
real ones cannot be downloaded here, and the speed does not depend on the values), converted to
ours by `convert.inception.convert_state_dict`, on the same random uint8 images of
`--image_size` px (32: CIFAR-10; both resize to 299 inside). Ours is timed as the metrics call it,
`InceptionExtractor(images)` (host uint8 in, the four outputs as numpy); torch-fidelity 0.4.0's
`FeatureExtractorInceptionV3` (outputs `2048` and `logits_unbiased`) under `torch.no_grad()` with
as many threads as usable cores (on CUDA when torch sees a GPU). After one warm-up call each (compilation excluded), `--repeats`
rounds alternate between the two, so machine load hits both alike; medians are printed as a
markdown table, with the largest pool-feature difference between the two as a check that they
compute the same network.

`--generate_and_score=N` also times what the job's `eval.metric='inception'` does for N samples
of the CIFAR-10 UNet (`configs/cifar.py`, random weights: the time does not depend on them): draw
them in shards with DDIM `--steps` (`sample_shards.generate`), then score them
(`score.score_inception`: features, FID, sFID, IS, precision/recall, KID) against a reference of
the real data's size (10,000 pool-feature rows for precision/recall and KID; random features,
whose values do not change the time; the reference is computed once and cached in real use, so
it is not timed). Both times are end to end, compilation included, as a job waits for them.
With fewer than 100 steps the table adds the DDIM-100 estimate, the generation
time scaled by 100 / steps (a DDIM step costs one UNet call).
"""

from __future__ import annotations

import importlib.metadata
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags

from benchmarks.common import cpu_model, random_teacher, write_json
from binarydm_jax.convert.inception import convert_state_dict
from binarydm_jax.evaluation import inception, reference, score
from binarydm_jax.evaluation.frechet import feature_statistics
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.sampling.sample_shards import generate, load_samples
from binarydm_jax.sampling.sampleable import Sampleable
from configs import cifar
from tests import torch_fidelity_compat

_BATCH = flags.DEFINE_integer("batch", 64, "Images per feature-extraction call.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the input images (resized to 299).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")
_GENERATE = flags.DEFINE_integer(
  "generate_and_score", 0, "Also time generating and scoring this many CIFAR-10 samples."
)
_STEPS = flags.DEFINE_integer("steps", 100, "DDIM steps of --generate_and_score.")
_SAMPLE_BATCH = flags.DEFINE_integer(
  "sample_batch", 64, "Samples per sampling call of --generate_and_score (all devices)."
)
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")

NETWORKS = ("flax", "torch-fidelity")
PAPER_STEPS = 100
REFERENCE_ROWS = reference.MAX_FEATURES


def _time(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def feature_throughput(batch: int, size: int, repeats: int) -> dict[str, Any]:
  """Seconds per batch of both networks (medians of interleaved rounds) and their pool difference."""
  torch_model, state_dict = torch_fidelity_compat.random_inception(
    features=("2048", "logits_unbiased")
  )
  ours = inception.InceptionExtractor(
    convert_state_dict({k: v.numpy() for k, v in state_dict.items()}), "0" * 64
  )
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_model.to(torch_device)
  nchw = torch.from_numpy(images).permute(0, 3, 1, 2)

  def run_torch() -> list[torch.Tensor]:  # Host uint8 in, host features out, as ours.
    with torch.no_grad():
      return [out.cpu() for out in torch_model(nchw.to(torch_device))]

  calls = {"flax": lambda: ours(images, batch_size=batch), "torch-fidelity": run_torch}
  outputs = {name: call() for name, call in calls.items()}  # Warm-up (and compilation).
  pool_theirs = outputs["torch-fidelity"][0].numpy()
  difference = np.max(np.abs(outputs["flax"].pool - pool_theirs)) / np.max(np.abs(pool_theirs))
  times: dict[str, list[float]] = {name: [] for name in NETWORKS}
  for _ in range(repeats):
    for name in NETWORKS:
      times[name].append(_time(calls[name]))
  median = {name: statistics.median(v) for name, v in times.items()}
  return {
    "seconds_per_batch": median,
    "images_per_s": {name: batch / m for name, m in median.items()},
    "times_s": times,
    "max_rel_diff_pool": float(difference),
    "torch_device": torch_device,
    "extractor": ours,
  }


def random_reference(rows: int, seed: int = 0) -> dict[str, Any]:
  """A reference of `rows` random pool and sFID features (timing only: values do not matter)."""
  rng = np.random.default_rng(seed)
  pool = rng.normal(size=(rows, inception.POOL_DIM)).astype(np.float32)
  spatial = rng.normal(size=(rows, inception.SPATIAL_DIM)).astype(np.float32)
  mu, sigma = feature_statistics(pool)
  mu_s, sigma_s = feature_statistics(spatial)
  return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pool": pool}


def generate_and_score(
  num: int, steps: int, batch: int, extractor: inception.InceptionExtractor
) -> dict[str, Any]:
  """Seconds to draw `num` CIFAR-10 samples (DDIM `steps`) in shards, and to score them."""
  config = cifar.get_config()
  model = unet_from_config(config.model)
  size, channels = config.data.image_size, config.model.channels
  x = jnp.zeros((1, size, size, channels))
  params = random_teacher(model, x, jnp.zeros((1,), jnp.int32))
  source = Sampleable(
    "random CIFAR-10 UNet", model, params, (size, size, channels), config.diffusion, config.sampling
  )
  ref = random_reference(REFERENCE_ROWS)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    generate(source, tmp, num, steps=steps, batch_size=batch, log=lambda line: print(line))
    generate_s = time.perf_counter() - start
    images = load_samples(tmp)
  score_s = _time(lambda: score.score_inception(images, ref, extractor))
  result = {
    "num_samples": num,
    "ddim_steps": steps,
    "sample_batch": batch,
    "unet_params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
    "weights": "random",
    "reference_rows": REFERENCE_ROWS,
    "generate_s": generate_s,
    "score_s": score_s,
    "total_s": generate_s + score_s,
  }
  if steps != PAPER_STEPS:
    result["estimated_total_s_at_ddim100"] = generate_s * PAPER_STEPS / steps + score_s
  return result


def main(argv: list[str]) -> None:
  del argv
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(cores)
  batch, size = _BATCH.value, _SIZE.value
  features = feature_throughput(batch, size, _REPEATS.value)
  extractor = features.pop("extractor")
  device = jax.devices()[0].device_kind
  versions = {
    "jax": jax.__version__,
    "torch": torch.__version__,
    "torch_fidelity": importlib.metadata.version("torch-fidelity"),
  }
  per_s = features["images_per_s"]
  print(
    f"{device} ({cpu_model()}, {cores} of {os.cpu_count()} cores usable, torch threads "
    f"{torch.get_num_threads()}); jax {versions['jax']}, torch {versions['torch']}, "
    f"torch-fidelity {versions['torch_fidelity']}; batch {batch} of uint8 {size}x{size} images "
    f"(resized to 299), {_REPEATS.value} interleaved repeats (median); pool features differ by "
    f"{features['max_rel_diff_pool']:.1e} relative"
  )
  print()
  print("| network | s / batch | images/s | vs torch-fidelity |")
  print("|---|---|---|---|")
  for name in NETWORKS:
    print(
      f"| {name} | {features['seconds_per_batch'][name]:.3f} | {per_s[name]:.1f} | "
      f"{per_s[name] / per_s['torch-fidelity']:.2f} |"
    )
  result = {
    "device": device,
    "cpu": cpu_model(),
    "cores_usable": cores,
    "torch_threads": torch.get_num_threads(),
    **versions,
    "batch": batch,
    "image_size": size,
    "repeats": _REPEATS.value,
    **features,
  }
  if _GENERATE.value:
    timed = generate_and_score(_GENERATE.value, _STEPS.value, _SAMPLE_BATCH.value, extractor)
    result["generate_and_score"] = timed
    num, steps = timed["num_samples"], timed["ddim_steps"]
    print()
    print(f"| {num} CIFAR-10 samples (random-weight UNet) | seconds | images/s |")
    print("|---|---|---|")
    rows = [
      (f"generate, DDIM {steps} steps, batch {timed['sample_batch']}", timed["generate_s"]),
      (f"score (features + metrics, {REFERENCE_ROWS:,}-row reference)", timed["score_s"]),
      ("total", timed["total_s"]),
    ]
    if "estimated_total_s_at_ddim100" in timed:
      rows.append(("total at DDIM 100 (generation scaled)", timed["estimated_total_s_at_ddim100"]))
    for label, seconds in rows:
      print(f"| {label} | {seconds:.1f} | {num / seconds:.2f} |")
  write_json(_JSON.value, result)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
