"""The paper's component ablation on the offline digits data: teacher, baseline, +EBB, +LRM, BinaryDM.

  python -m benchmarks.ablation_digits --teacher=/tmp/digits/teacher --out=/tmp/ablation.json

On a CPU, one worker per core is faster overall than one process on all cores (BENCHMARKS.md):

  taskset -c 0 python -m benchmarks.ablation_digits --teacher=T --worker=0/2 --out=/tmp/a0.json &
  taskset -c 1 python -m benchmarks.ablation_digits --teacher=T --worker=1/2 --out=/tmp/a1.json
  python -m benchmarks.ablation_digits --report=/tmp/a0.json,/tmp/a1.json

Every student starts from the same FP teacher (a `WORKDIR/teacher` of an earlier digits run, or a
converted checkpoint) and is trained and evaluated with the library's own QAT stage and digits-FID,
once per (bit-width, method, seed). Prints a markdown table of mean and spread per cell.
`--fid_every=N` also scores each run every N steps (its `fid_curve`): has the FID stopped moving?
`--set=KEY=VALUE` (repeatable) changes any config field for every run, e.g. the paper's lambda,
tau or switch-step ablations: `--set=qat.lrm_weight=1e-3`, `--set=qat.lr_schedule=cosine_stage2`.
"""

import ast
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from clu import metric_writers

from benchmarks.common import code_version
from binarydm_jax import diffusion
from binarydm_jax.convert.teacher import assert_same_architecture, load_teacher
from binarydm_jax.data.input_pipeline import load_dataset
from binarydm_jax.evaluation import evaluator, fidelity
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.quant import PRESETS
from binarydm_jax.runtime import sharding
from binarydm_jax.sampling import samplers
from binarydm_jax.student import resolve_settings
from binarydm_jax.training import qat_stage
from binarydm_jax.training import switch as switch_lib
from binarydm_jax.training.config_validation import ConfigError, validate_config
from binarydm_jax.training.job import Job
from configs import digits

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", None, "Trained FP teacher: WORKDIR/teacher of a digits run.")
flags.DEFINE_list("bits", ["W1A32", "W1A8", "W1A4"], "quant.preset values.")
flags.DEFINE_list("methods", ["baseline", "ebb", "lrm", "binarydm"], "Rows of the ablation.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "QAT seeds (noise, dropout, data order).")
flags.DEFINE_integer("qat_steps", None, "QAT steps (default: configs/digits.py's).")
flags.DEFINE_enum("ebb_form", None, ["paper", "decoupled"], "qat.ebb_form (default: the config's).")
flags.DEFINE_string(
  "out", None, "Results JSON, rewritten after every run; runs already in it are skipped."
)
flags.DEFINE_string(
  "worker", "0/1", "i/n: run only every n-th (bits, method, seed), from the i-th."
)
flags.DEFINE_bool("raw_params", False, "Also evaluate the final non-EMA params (fid_raw).")
flags.DEFINE_integer(
  "fid_every",
  None,
  "Also evaluate the EMA params every N QAT steps (fid_curve): a convergence check.",
)
flags.DEFINE_bool(
  "switch_fid",
  True,
  "EBB runs: also score the two-basis student of the switch step S (EMA, raw, EMA collapsed) "
  "and the single-basis one that step S + 1 starts from, and record the switch report.",
)
flags.DEFINE_integer(
  "switch_num_samples",
  512,
  "Samples of the two switch FIDs (the collapsed student scores in the thousands: a rough "
  "number suffices); the final FID uses eval.num_samples.",
)
flags.DEFINE_multi_string(
  "set",
  [],
  "KEY=VALUE: a config override for every run (repeatable), e.g. qat.lrm_weight=1e-3; "
  "recorded in the results JSON.",
)
flags.DEFINE_list("report", None, "Print the table of these results JSONs and exit.")
flags.DEFINE_integer(
  "fidelity_num",
  512,
  "Samples of the paired measure: each final student against the teacher from the same noises.",
)

PAIRED_SEED = 2024  # Noises of the paired measure, the same for the teacher and every student.
FIDELITY_KEYS = ("psnr", "mse", "label_agreement", "mean_bias", "background", "per_image_mse")
# Method name -> (qat.method, qat.ebb, qat.lrm).
METHODS = {
  "baseline": ("baseline", False, False),
  "ebb": ("binarydm", True, False),
  "lrm": ("binarydm", False, True),
  "binarydm": ("binarydm", True, True),
}


def paired_images(sampler, params) -> np.ndarray:
  """The `--fidelity_num` DDIM samples of the paired measure (the same noises for every model)."""
  batch = min(256, FLAGS.fidelity_num)
  return samplers.sample_many(
    sampler, params, jax.random.PRNGKey(PAIRED_SEED), FLAGS.fidelity_num, batch
  )


def run_one(job: Job, teacher_params, teacher_images: np.ndarray) -> dict[str, float]:
  """Trains one student in a fresh workdir; its digits-FID (EMA params, as the job samples).

  The final scores are `fid` (held-out split) and, beside it, `fid_all` (all real digits), `fid_ci`
  (bootstrap interval of `fid`), `kid_x1e3` and `kid_std_x1e3` (KID x 1e3;
  `evaluation.digits_fid.digits_metrics`) and `reliable` (enough samples for each metric,
  `evaluation.minimums`; runs before it was recorded have `kid`, `kid_std`, the raw KID).

  With --raw_params also `fid_raw`: the same student's final non-averaged params; with
  --fid_every also `fid_curve`: {step: FID of the EMA params} along the run; with --switch_fid
  and EBB also `switch`: the switch report of `qat_stage.switch_transition` plus, at step S, the
  two-basis student's `fid_two_basis` (EMA params), `fid_two_basis_raw` (raw params) and
  `fid_collapsed_ema` (its EMA with sigma_II = 0), and `fid_collapsed` (step S + 1: sigma_II = 0;
  with the EMA restart, the raw single-basis params).
  """
  config = job.config
  with tempfile.TemporaryDirectory() as workdir:
    writer = metric_writers.create_default_writer(workdir, just_logging=True)

    samplers = []  # The student's sampler, kept from the training stage for the final FIDs.
    curve = {}
    switch = {}  # The switch report and the two FIDs around it.
    settings = resolve_settings(config.qat, config.quant)
    score_switch = FLAGS.switch_fid and settings.ebb and settings.switch_step < config.qat.num_steps

    def scores(params, num_samples: int | None = None) -> dict:
      scored = config.copy_and_resolve_references()
      scored.eval.num_samples = num_samples or config.eval.num_samples
      return evaluator.evaluate_sampler(
        "student", samplers[0], params, scored, job.dataset, workdir, writer
      )

    def fid(params, num_samples: int | None = None) -> float:
      return scores(params, num_samples)["fid"]

    def on_sample_factory(name: str, sampler):
      samplers.append(sampler)

      def on_sample(state, step: int) -> None:
        # The final FID is the `fid` entry.
        if FLAGS.fid_every and step % FLAGS.fid_every == 0 and step < config.qat.num_steps:
          curve[str(step)] = fid(state.ema_params)
          logging.info("ablation: step %d, digits-FID %.1f", step, curve[str(step)])
        if score_switch and step in (settings.switch_step, settings.switch_step + 1):
          # Step S: the two-basis student, EMA and raw, and its EMA collapsed (sigma_II = 0, what
          # the EMA would carry on from without the restart); step S + 1: the student after the
          # switch update (with the restart its EMA is the raw single-basis params).
          students = (
            {
              "fid_two_basis": state.ema_params,
              "fid_two_basis_raw": state.params,
              "fid_collapsed_ema": switch_lib.collapse(state.ema_params),
            }
            if step == settings.switch_step
            else {"fid_collapsed": state.ema_params}
          )
          for key, params in students.items():
            switch[key] = fid(params, FLAGS.switch_num_samples)
            logging.info("ablation: switch, step %d, %s %.1f", step, key, switch[key])
          switch["num_samples"] = FLAGS.switch_num_samples

      return on_sample

    def on_switch(report):  # Runs before step S, after the two-basis sample at S.
      switch.update(report)

    _, state = qat_stage.train_student(
      dataclasses.replace(job, workdir=workdir, writer=writer, on_sample=on_sample_factory),
      teacher_params,
      on_switch=on_switch if score_switch else None,
    )
    final = scores(state.ema_params)
    # The held-out FID, and the steadier / interval scores beside it (see the metric's noise).
    keys = ("fid", "fid_all", "fid_ci", "kid_x1e3", "kid_std_x1e3", "reliable")
    result = {key: final[key] for key in keys}
    paired = fidelity.image_fidelity(
      teacher_images,
      paired_images(samplers[0], state.ema_params),
      fidelity.digits_classifier(job.dataset.train.shape[1:]),
    )
    result["fidelity"] = {key: paired[key] for key in FIDELITY_KEYS}
    if FLAGS.raw_params:
      result["fid_raw"] = fid(state.params)
    if curve:
      result["fid_curve"] = curve
    if switch:
      result["switch"] = switch
    return result


def parse_worker(spec: str) -> tuple[int, int]:
  """'i/n' -> (i, n), with a usable error for anything else."""
  try:
    index, count = map(int, spec.split("/"))
  except ValueError:
    index, count = -1, 0
  if not 0 <= index < count:
    raise app.UsageError(f"--worker={spec!r}: expected i/n with 0 <= i < n, e.g. 0/2")
  return index, count


def parse_overrides(specs: list[str]) -> dict[str, Any]:
  """['qat.lrm_weight=1e-3', 'qat.lr_schedule=cosine_stage2'] -> {key: Python value}.

  Values are Python literals where they parse as one (1e-3, 800, True, (1, 2)), else strings.
  """
  overrides = {}
  for spec in specs:
    key, sep, raw = spec.partition("=")
    if not sep or not key:
      raise app.UsageError(f"--set={spec!r}: expected KEY=VALUE, e.g. --set=qat.lrm_weight=1e-3")
    try:
      overrides[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      overrides[key] = raw
  return overrides


def apply_overrides(config, overrides: dict[str, Any]) -> None:
  """Sets each `section.field` of `config`; an unknown field or a wrong type is a UsageError."""
  for key, value in overrides.items():
    *sections, field = key.split(".")
    node = config
    try:
      for section in sections:
        node = node[section]
      if field not in node:
        raise KeyError(field)
      node[field] = value
    except (KeyError, TypeError, AttributeError) as e:
      raise app.UsageError(f"--set={key}={value!r}: not a field of the digits config ({e})") from e


def grid_configs(base, bits: list[str], methods: list[str], seeds: list[int]) -> list[tuple]:
  """[((bits, method, seed), config)], all validated before any work starts.

  Seeds outermost: a grid cut short still has every (bits, method) cell for its first seeds.
  """
  for flag, names, known in (("methods", methods, METHODS), ("bits", bits, PRESETS)):
    unknown = sorted(set(names) - set(known))
    if unknown:
      raise app.UsageError(f"--{flag}: unknown {unknown}; expected some of {list(known)}")
  grid = []
  for seed in seeds:
    for b in bits:
      for name in methods:
        config = base.copy_and_resolve_references()
        config.quant.preset = b
        config.qat.method, config.qat.ebb, config.qat.lrm = METHODS[name]
        config.qat.seed = seed
        config.data.seed = seed
        try:
          validate_config(config)
        except ConfigError as e:
          raise app.UsageError(str(e)) from e
        grid.append(((b, name, seed), config))
  return grid


def load_results(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def settings_of(results: dict) -> tuple:
  """What every run of a results JSON shares: (QAT steps, EBB form, the --set overrides)."""
  # As JSON text: a tuple override read back from a results file is a list, and must compare equal.
  overrides = json.dumps(results.get("overrides", {}), sort_keys=True)
  return results["qat_steps"], results.get("ebb_form"), overrides


def _mean_std(values: list[float], digits: int = 1) -> str:
  """'mean ± std (n=N)' over seeds (sample std, n - 1), or '-' for no runs."""
  if not values:
    return "-"
  spread = np.std(values, ddof=1) if len(values) > 1 else float("nan")
  return f"{np.mean(values):.{digits}f} ± {spread:.{digits}f} (n={len(values)})"


def print_table(results: list[dict], bits: list[str], methods: list[str]) -> None:
  """Mean and spread (std over seeds) of the digits-FID per (bit-width, method), EMA then raw;
  then per bit-width each method's seeds and, for runs with a `fid_curve`, the means along it."""
  runs = [r for result in results for r in result["runs"]]
  teacher = [result["teacher"] for result in results if result.get("teacher") is not None]
  settings = sorted({settings_of(result) for result in results})
  if teacher:
    print(f"teacher (FP): digits-FID {teacher[0]:.1f}")
  print(f"(QAT steps, EBB form, overrides): {settings}")
  for key in ("fid", "fid_raw"):
    if not any(key in r for r in runs):
      continue
    print(f"\n{key}:\n| bits | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for b in bits:
      cells = [
        _mean_std([r[key] for r in runs if (r["bits"], r["method"]) == (b, name) and key in r])
        for name in methods
      ]
      print(f"| {b} | " + " | ".join(cells) + " |")
  for b in bits:
    print_seed_table([r for r in runs if r["bits"] == b], b, methods)


def print_seed_table(runs: list[dict], bits: str, methods: list[str]) -> None:
  """One bit-width's runs: a row per method with its FID per seed, their mean ± std, the
  mean ± std at each mid-run step that was scored (`--fid_every`) and, for runs with a switch
  record, at the switch: the two-basis student of step S (EMA, raw, EMA collapsed), the
  single-basis one of step S + 1 and mean|sigma_II| / mean|sigma_I| at S."""
  if not runs:
    return
  seeds = sorted({r["seed"] for r in runs})
  steps = sorted({int(step) for r in runs for step in r.get("fid_curve", {})})
  print(f"\n{bits}, digits-FID per seed (EMA params):")
  columns = [f"seed {s}" for s in seeds] + ["mean ± std"] + [f"at step {s}" for s in steps]
  switch_columns = {
    "fid_two_basis": "switch: 2-basis EMA (S)",
    "fid_two_basis_raw": "2-basis raw (S)",
    "fid_collapsed_ema": "EMA collapsed (S)",
    "fid_collapsed": "1-basis (S+1)",
    "sigma_II_over_sigma_I": "σII/σI at S",
  }
  has_switch = any("switch" in r for r in runs)
  has_fidelity = any("fidelity" in r for r in runs)
  if has_fidelity:
    columns += ["paired PSNR (dB)", "label agreement"]
  if has_switch:
    columns += list(switch_columns.values())
  print("| method | " + " | ".join(columns) + " |")
  print("|---|" + "---|" * len(columns))
  for name in methods:
    rows = [r for r in runs if r["method"] == name]
    if not rows:
      continue
    by_seed = {r["seed"]: r["fid"] for r in rows}
    cells = [f"{by_seed[s]:.1f}" if s in by_seed else "-" for s in seeds]
    cells.append(_mean_std(list(by_seed.values())))
    for step in steps:
      cells.append(
        _mean_std([r["fid_curve"][str(step)] for r in rows if str(step) in r.get("fid_curve", {})])
      )
    if has_fidelity:
      for key, places in (("psnr", 2), ("label_agreement", 3)):
        values = [r["fidelity"][key] for r in rows if r.get("fidelity", {}).get(key) is not None]
        cells.append(_mean_std(values, places))
    if has_switch:
      for key in switch_columns:
        values = [r["switch"][key] for r in rows if key in r.get("switch", {})]
        cells.append(_mean_std(values, digits=2 if key.startswith("sigma") else 1))
    print(f"| {name} | " + " | ".join(cells) + " |")
  print_paired(runs, methods)


def print_paired(runs: list[dict], methods: list[str]) -> None:
  """Per seed, each method minus the first method run on that seed (digits-FID and paired PSNR):
  the differences, their mean ± std and how many seeds favour the method."""
  by_cell = {(r["method"], r["seed"]): r for r in runs}
  base = next((m for m in methods if any(r["method"] == m for r in runs)), None)
  rows = []
  for name in methods:
    seeds = sorted(s for (m, s) in by_cell if m == name and (base, s) in by_cell)
    if name == base or not seeds:
      continue
    for key, places, better in (("fid", 1, -1), ("psnr", 2, 1)):
      diffs = []
      for s in seeds:
        a, b = by_cell[(name, s)], by_cell[(base, s)]
        if key == "fid":
          diffs.append(a["fid"] - b["fid"])
        elif "fidelity" in a and "fidelity" in b:
          diffs.append(a["fidelity"]["psnr"] - b["fidelity"]["psnr"])
      if diffs:
        wins = sum(1 for d in diffs if d * better > 0)
        values = ", ".join(f"{d:+.{places}f}" for d in diffs)
        rows.append(
          f"| {name} - {base} | {key} | {values} | {_mean_std(diffs, places)} | {wins}/{len(diffs)} |"
        )
  if rows:
    print("\nPaired by seed (method minus the first method of the same seed):")
    print("| pair | measure | per seed | mean ± std | seeds better |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def main(argv):
  del argv
  if FLAGS.report:
    print_table([load_results(p) for p in FLAGS.report], FLAGS.bits, FLAGS.methods)
    return
  if not FLAGS.teacher:
    raise app.UsageError("--teacher is required (a WORKDIR/teacher of a digits run)")
  worker, num_workers = parse_worker(FLAGS.worker)
  base = digits.get_config()
  if FLAGS.qat_steps:
    base.qat.num_steps = FLAGS.qat_steps
  if FLAGS.ebb_form:
    base.qat.ebb_form = FLAGS.ebb_form
  overrides = parse_overrides(FLAGS.set)
  apply_overrides(base, overrides)
  base.training.sample_every = FLAGS.fid_every or 10**9  # Mid-run scores only on request.
  grid = grid_configs(base, FLAGS.bits, FLAGS.methods, [int(s) for s in FLAGS.seeds])
  code = code_version()  # Of the code imported now, not of the tree when a run ends.
  mesh = sharding.make_mesh(base.mesh)
  dataset = load_dataset(base.data)
  schedule = diffusion.schedule_from_config(base.diffusion)
  teacher_config, teacher_params = load_teacher(FLAGS.teacher)
  assert_same_architecture(base.model, teacher_config, base.data.image_size)
  # Restored on one device; the samplers and the QAT step expect the mesh's placement.
  teacher_params = jax.device_put(teacher_params, sharding.tree_shardings(teacher_params, mesh))
  # The stages' shared objects; each run replaces the config, workdir, writer and callbacks.
  base_job = Job(base, "", mesh, dataset, unet_from_config(base.model), schedule, None, None)
  results = {
    "teacher": None,
    "qat_steps": base.qat.num_steps,
    "ebb_form": base.qat.ebb_form,
    "overrides": overrides,
    "runs": [],
  }
  if FLAGS.out and os.path.exists(FLAGS.out):  # Continue an earlier, interrupted ablation.
    earlier = load_results(FLAGS.out)
    if settings_of(earlier) != settings_of(results):
      raise app.UsageError(
        f"--out={FLAGS.out} holds runs of other settings ({settings_of(earlier)}, not "
        f"{settings_of(results)}); use a new file"
      )
    results = earlier

  def save():
    if FLAGS.out and jax.process_index() == 0:
      with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)

  if worker == 0 and results["teacher"] is None:
    with tempfile.TemporaryDirectory() as workdir:
      writer = metric_writers.create_default_writer(workdir, just_logging=True)
      job = dataclasses.replace(base_job, workdir=workdir, writer=writer)
      results["teacher"] = job.evaluate("teacher", teacher_params, job.model)["fid"]
    save()
  teacher_images = paired_images(base_job.sampler(base_job.model), teacher_params)
  for (bits, name, seed), config in grid[worker::num_workers]:
    if any((r["bits"], r["method"], r["seed"]) == (bits, name, seed) for r in results["runs"]):
      continue
    started = time.time()
    fids = run_one(dataclasses.replace(base_job, config=config), teacher_params, teacher_images)
    minutes = (time.time() - started) / 60
    logging.info("ablation %s %s seed %d: %s (%.1f min)", bits, name, seed, fids, minutes)
    results["runs"].append(
      {
        "bits": bits,
        "method": name,
        "seed": seed,
        **fids,
        "minutes": round(minutes, 2),
        "code": code,
      }
    )
    save()
  print_table([results], FLAGS.bits, FLAGS.methods)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
