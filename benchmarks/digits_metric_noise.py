"""How much the digits metrics move with the sampling seed, per number of samples, and what each
number costs: which `eval.num_samples` makes two evaluations of one model agree?

  taskset -c 1 python -m benchmarks.digits_metric_noise [--teacher=DIR] [--seeds=0,1,2] \
      [--counts=512,1024,2048,4096] [--batch_size=N]

Draws max(--counts) samples of the teacher (the digits config's sampler, e.g. DDIM-50) per
`eval.seed` of --seeds; the evaluation of N samples is the first N of them, exactly the samples
`evaluate_sampler` draws with `eval.num_samples=N` (batch i of the noise depends only on the seed
and i). Prints per count the per-seed fid / fid_all / kid_x1e3 (KID x 1e3), their std over seeds
(population) and largest difference between two seeds, and the seconds one evaluation of N
samples costs: its sampling time (the measured seconds per image times N, compile excluded) plus
its scoring time. It scores every count given, also one below a metric's minimum
(`evaluation.minimums`): `reliable` in the per-seed lines says so.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags

from binarydm_jax import diffusion
from binarydm_jax.convert.teacher import assert_same_architecture, load_teacher
from binarydm_jax.data.input_pipeline import load_dataset
from binarydm_jax.evaluation import minimums, score
from binarydm_jax.evaluation.digits_classifier import DigitsFeatureExtractor
from binarydm_jax.evaluation.digits_fid import digits_metrics
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.runtime import sharding
from binarydm_jax.sampling import samplers
from configs import digits

_TEACHER = flags.DEFINE_string(
  "teacher",
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "digits_teacher_2026-12-02"),
  "FP teacher: a teacher checkpoint or WORKDIR/teacher of a digits run.",
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "eval.seed values (noise, bootstrap, KID).")
_COUNTS = flags.DEFINE_list("counts", ["512", "1024", "2048", "4096"], "eval.num_samples values.")
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size",
  0,
  "Sampling batch (0: the config's eval.batch_size; an accelerator takes thousands).",
)
METRICS = ("fid", "fid_all", "kid_x1e3")


def spread_row(count: int, by_seed: list[dict], seconds: float) -> str:
  """A markdown row: per metric the per-seed values, std over seeds and max pairwise difference."""
  cells = [str(count)]
  for key in METRICS:
    values = np.array([scores[key] for scores in by_seed])
    fmt = ".4g" if key == "kid_x1e3" else ".1f"
    cells.append(" / ".join(f"{v:{fmt}}" for v in values))
    cells.append(f"{values.std():{fmt}}")
    cells.append(f"{values.max() - values.min():{fmt}}")
  cells.append(f"{seconds:.0f}")
  return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    seeds = [int(s) for s in _SEEDS.value]
    counts = sorted(int(c) for c in _COUNTS.value)
  except ValueError as e:
    raise app.UsageError(f"--seeds and --counts take integers ({e})") from e
  if len(seeds) < 2 or counts[0] < 2:
    raise app.UsageError("--seeds needs at least 2 seeds and --counts values >= 2")
  config = digits.get_config()
  teacher_config, params = load_teacher(_TEACHER.value)
  assert_same_architecture(config.model, teacher_config, config.data.image_size)
  dataset = load_dataset(config.data)
  image_shape = dataset.train.shape[1:]
  sampler = samplers.make_sampler(
    unet_from_config(config.model),
    diffusion.schedule_from_config(config.diffusion),
    config.sampling,
    sharding.make_mesh(config.mesh),
    image_shape,
  )
  extractor = DigitsFeatureExtractor(image_shape[0], cache_dir=config.eval.cache_dir)
  batch_size = _BATCH_SIZE.value or config.eval.batch_size
  started = time.time()
  sampler(params, jax.random.PRNGKey(0), batch_size)  # Compile (and one batch), untimed below.
  print(
    f"teacher {_TEACHER.value}, DDIM-{config.sampling.ddim_steps}, batch {batch_size}, "
    f"compile + first batch {time.time() - started:.0f} s",
    flush=True,
  )

  scores = {count: [] for count in counts}  # count -> [metrics per seed]
  seconds = {count: [] for count in counts}
  for seed in seeds:
    started = time.time()
    samples = samplers.sample_many(
      sampler, params, jax.random.PRNGKey(seed), counts[-1], batch_size
    )
    per_image = (time.time() - started) / counts[-1]
    for count in counts:
      started = time.time()
      needs = score.digits_needs(count, len(dataset.heldout))
      scores[count].append(
        digits_metrics(samples[:count], dataset.heldout, dataset.train, extractor, seed=seed)
        | minimums.judge(needs, allow_few_samples=True)
      )
      seconds[count].append(per_image * count + time.time() - started)
      print(f"seed {seed}, {count} samples: {scores[count][-1]}", flush=True)

  print(
    f"\nseeds {seeds}; per metric: the values per seed, std over seeds, max difference; "
    "seconds of one evaluation (sampling + scoring, mean over seeds)\n"
  )
  header = ["samples"] + [
    f"{key} {part}" for key in METRICS for part in ("per seed", "std", "max diff")
  ]
  print("| " + " | ".join(header + ["s / evaluation"]) + " |")
  print("|---" * (len(header) + 1) + "|")
  for count in counts:
    print(spread_row(count, scores[count], float(np.mean(seconds[count]))))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
