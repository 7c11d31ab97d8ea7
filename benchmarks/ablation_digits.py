"""The paper's component ablation on the offline digits data: teacher, baseline, +EBB, +LRM, BinaryDM.

  python -m benchmarks.ablation_digits --teacher=/tmp/digits/teacher --out=/tmp/ablation.json

Every student starts from the same FP teacher (a `WORKDIR/teacher` of an earlier digits run, or a
converted checkpoint) and is trained and evaluated with the library's own QAT stage and digits-FID,
once per (bit-width, method, seed). Prints a markdown table of mean and spread per cell.
"""

import json
import os
import tempfile

import jax
import numpy as np
from absl import app, flags, logging
from clu import metric_writers

from binarydm_jax import diffusion, evaluate, qat, sharding, train
from binarydm_jax.input_pipeline import load_dataset
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.teacher import assert_same_architecture, load_teacher
from configs import digits

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", None, "Trained FP teacher: WORKDIR/teacher of a digits run.")
flags.DEFINE_list("bits", ["W1A32", "W1A8", "W1A4"], "quant.preset values.")
flags.DEFINE_list("methods", ["baseline", "ebb", "lrm", "binarydm"], "Rows of the ablation.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "QAT seeds (noise, dropout, data order).")
flags.DEFINE_integer("qat_steps", None, "QAT steps (default: configs/digits.py's).")
flags.DEFINE_string(
  "out", None, "Results JSON, rewritten after every run; runs already in it are skipped."
)
flags.mark_flags_as_required(["teacher"])

# Method name -> (qat.method, qat.ebb, qat.lrm).
METHODS = {
  "baseline": ("baseline", False, False),
  "ebb": ("binarydm", True, False),
  "lrm": ("binarydm", False, True),
  "binarydm": ("binarydm", True, True),
}


def run_one(config, teacher_params, model, dataset, mesh, schedule) -> float:
  """Trains one student in a fresh workdir and returns its digits-FID."""
  with tempfile.TemporaryDirectory() as workdir:
    writer = metric_writers.create_default_writer(workdir, just_logging=True)
    callbacks = train.sample_callbacks(config, workdir, writer)
    student, params = qat.train_student(
      config, workdir, mesh, dataset, model, teacher_params, schedule, writer, callbacks
    )
    result = evaluate.evaluate_model(
      "student", params, student, schedule, config, dataset, mesh, workdir, writer
    )
  return result["fid"]


def main(argv):
  del argv
  base = digits.get_config()
  if FLAGS.qat_steps:
    base.qat.num_steps = FLAGS.qat_steps
  base.training.sample_every = 10**9  # No intermediate grids.
  mesh = sharding.make_mesh(base.mesh)
  dataset = load_dataset(base.data)
  schedule = diffusion.schedule_from_config(base.diffusion)
  teacher_config, teacher_params = load_teacher(FLAGS.teacher)
  assert_same_architecture(base.model, teacher_config, base.data.image_size)
  model = unet_from_config(base.model)
  with tempfile.TemporaryDirectory() as workdir:
    writer = metric_writers.create_default_writer(workdir, just_logging=True)
    teacher_fid = evaluate.evaluate_model(
      "teacher", teacher_params, model, schedule, base, dataset, mesh, workdir, writer
    )["fid"]
  results = {"teacher": teacher_fid, "qat_steps": base.qat.num_steps, "runs": []}
  if FLAGS.out and os.path.exists(FLAGS.out):  # Continue an earlier, interrupted ablation.
    with open(FLAGS.out) as f:
      earlier = json.load(f)
    if earlier["qat_steps"] == base.qat.num_steps:
      results["runs"] = earlier["runs"]
  # Seeds outermost: a run cut short still has every (bits, method) cell for its first seeds.
  for seed in map(int, FLAGS.seeds):
    for bits in FLAGS.bits:
      for name in FLAGS.methods:
        done = [
          r for r in results["runs"] if (r["bits"], r["method"], r["seed"]) == (bits, name, seed)
        ]
        if done:
          continue
        config = base.copy_and_resolve_references()
        config.quant.preset = bits
        config.qat.method, config.qat.ebb, config.qat.lrm = METHODS[name]
        config.qat.seed = seed
        config.data.seed = seed
        fid = run_one(config, teacher_params, model, dataset, mesh, schedule)
        logging.info("ablation %s %s seed %d: digits-FID %.1f", bits, name, seed, fid)
        results["runs"].append({"bits": bits, "method": name, "seed": seed, "fid": fid})
        if FLAGS.out and jax.process_index() == 0:
          with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)
  print(f"teacher (FP): digits-FID {teacher_fid:.1f}; QAT {base.qat.num_steps} steps")
  print("| bits | " + " | ".join(FLAGS.methods) + " |")
  print("|---|" + "---|" * len(FLAGS.methods))
  for bits in FLAGS.bits:
    cells = []
    for name in FLAGS.methods:
      fids = [r["fid"] for r in results["runs"] if r["bits"] == bits and r["method"] == name]
      cells.append(f"{np.mean(fids):.1f} ± {np.std(fids):.1f} (n={len(fids)})" if fids else "-")
    print(f"| {bits} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
