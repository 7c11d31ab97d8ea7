"""The paired fidelity of a student to its teacher: the same noises, the same DDIM path.

  python -m binarydm_jax.fidelity --workdir=DIR [--export=DIR/export] --num=512 \
      --json=fidelity.json --out=pairs.png

The teacher is the job's (WORKDIR/teacher or its teacher.source); the student is the job's student
checkpoint, or with --export an export of it (--inference=int8 for the integer path). Prints and
writes MSE, PSNR, the digits label agreement, the mean bias and background share, and each
quantized input's SQNR by timestep group (`evaluation/fidelity.py` defines each number); the PNG
shows teacher rows over the student's images from the same noises.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags
from etils import epath

from binarydm_jax import diffusion, workdir
from binarydm_jax.data.input_pipeline import load_dataset
from binarydm_jax.errors import one_line_errors
from binarydm_jax.evaluation import fidelity
from binarydm_jax.sampling import samplers
from binarydm_jax.sampling.sampleable import Sampleable, draw, from_trained, load

_WORKDIR = flags.DEFINE_string("workdir", None, "The job's --workdir (its teacher, its data).")
_EXPORT = flags.DEFINE_string("export", None, "Score this export instead of WORKDIR/student.")
_INFERENCE = flags.DEFINE_enum(
  "inference", "float", ["float", "int8"], "--export: fake-quant float or the int8 path."
)
_NUM = flags.DEFINE_integer("num", 512, "Paired samples (the same noises for both models).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the noises.")
_STEPS = flags.DEFINE_integer("steps", None, "DDIM steps; default: the job's sampling.ddim_steps.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Samples drawn per compiled call.")
_GROUPS = flags.DEFINE_integer("sqnr_groups", 10, "Timestep groups of the SQNR table.")
_SQNR_IMAGES = flags.DEFINE_integer(
  "sqnr_images", 64, "Training images noised in each timestep group for the SQNR table."
)
_JSON = flags.DEFINE_string("json", None, "Write the measure here.")
_OUT = flags.DEFINE_string("out", None, "PNG of teacher/student pairs from the same noises.")


def measure(teacher: Sampleable, student: Sampleable, config) -> dict:
  """The paired measure and the SQNR table of `student` against `teacher` (flags set the sizes)."""
  teacher_images = draw(teacher, _NUM.value, "ddim", _STEPS.value, _SEED.value, _BATCH.value)
  student_images = draw(student, _NUM.value, "ddim", _STEPS.value, _SEED.value, _BATCH.value)
  result = fidelity.image_fidelity(
    teacher_images, student_images, fidelity.digits_classifier(student.sample_shape)
  )
  schedule = diffusion.schedule_from_config(student.diffusion)
  dataset = load_dataset(config.data, config.model.channels)
  x_t, t = fidelity.timestep_group_batch(
    dataset.train[: _SQNR_IMAGES.value], schedule, _GROUPS.value
  )
  result["sqnr"] = fidelity.sqnr_table(
    student.model, student.params, x_t, t, _GROUPS.value, schedule.num_timesteps
  )
  result["student"], result["teacher"] = student.name, teacher.name
  if _OUT.value:
    samplers.save_png(fidelity.pairs_grid(teacher_images, student_images), _OUT.value)
  return result


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir=DIR is required (the job whose teacher is the reference)")
  if min(_NUM.value, _BATCH.value, _GROUPS.value, _SQNR_IMAGES.value) < 1:
    raise app.UsageError("--num, --batch_size, --sqnr_groups and --sqnr_images must be positive")
  with one_line_errors():
    trained = workdir.load_teacher_stage(_WORKDIR.value)
    teacher = from_trained(f"teacher of {_WORKDIR.value}", trained)
    student = load(_EXPORT.value, _WORKDIR.value, "student", _INFERENCE.value)
    result = measure(teacher, student, trained.config)
  if _JSON.value and jax.process_index() == 0:
    path = epath.Path(_JSON.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
  agreement = result["label_agreement"]
  print(
    f"{result['student']} against the {result['teacher']}, {result['num']} paired samples: "
    f"PSNR {result['psnr']:.2f} dB, MSE {result['mse']:.4f}, mean bias {result['mean_bias']:+.4f}"
    + (f", label agreement {agreement:.3f}" if agreement is not None else "")
  )
  if result["sqnr"]["layers"]:
    print(f"SQNR of the quantized inputs (dB), mean {result['sqnr']['mean']:.1f}:")
    print(fidelity.format_sqnr(result["sqnr"]))


if __name__ == "__main__":
  app.run(main)
