"""The job, one stage per call: teacher -> its evaluation -> student -> its evaluation -> export.

`run(config, workdir)` is what `python -m binarydm_jax.main` does. Each stage resumes from its
own checkpoints (training) or sample shards (evaluation), so a preempted job rerun with the same
workdir picks up where it stopped.
"""

from __future__ import annotations

import logging as pylogging
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from etils import epath

from binarydm_jax import diffusion, efficiency, export, student
from binarydm_jax.convert.teacher import assert_same_architecture, load_teacher
from binarydm_jax.data import first_stage
from binarydm_jax.data.input_pipeline import ImageDataset, load_dataset
from binarydm_jax.evaluation import evaluator
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.runtime import lazy_imports, sharding
from binarydm_jax.sampling import samplers
from binarydm_jax.training import fp_stage, prerequisites, qat_stage, workdir_lock
from binarydm_jax.training.config_validation import validate_config
from binarydm_jax.training.job import Job
from binarydm_jax.training.preemption import Preempted


def setup_job(config: ml_collections.ConfigDict, workdir: str) -> Job:
  """Checks the config and the job's prerequisites, then builds the mesh, data, UNet and writer.

  Everything that can fail on bad input fails here, before any training: every config value
  (the student's quantization policy included) and every missing prerequisite (data, teacher,
  first stage, Inception weights) before the workdir is even created, and too few evaluation
  samples for a metric (`evaluator.check_sample_counts`) once the data is loaded.
  """
  validate_config(config)
  prerequisites.check(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  for key in ("training.batch_size", "qat.batch_size", "eval.batch_size", "sampling.grid_size"):
    section, field = key.split(".")
    sharding.check_batch_divisible(config[section][field], mesh, f"config.{key}")
  logging.info("Mesh: %s over %d process(es)", dict(mesh.shape), jax.process_count())
  images, first, dataset = load_data(config)
  # Too few evaluation samples for a metric: refused now, not after training (or allowed).
  reliability = evaluator.check_sample_counts(config, images)
  if not reliability.get("reliable", True):
    logging.warning(
      "eval.allow_few_samples: the evaluation will be unreliable: %s",
      "; ".join(reliability["unreliable"]),
    )
  writers = lazy_imports.metric_writers()
  writer = writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0 and not (epath.Path(workdir) / "teacher").exists():
    writer.write_hparams(_flat_hparams(config))
  return Job(
    config=config,
    workdir=workdir,
    mesh=mesh,
    dataset=dataset,
    model=unet_from_config(config.model),
    schedule=diffusion.schedule_from_config(config.diffusion),
    writer=writer,
    on_sample=samplers.grid_callbacks(config, workdir, writer),
    first_stage=first,
    images=images,
  )


def load_data(
  config: ml_collections.ConfigDict,
) -> tuple[ImageDataset, first_stage.FirstStage | None, ImageDataset]:
  """(images, first stage, what the UNet trains on): the images or, with a first stage, latents.

  A latent diffusion job loads its images at `first_stage.image_size(config)` (RGB) and encodes
  them once here; the frozen first stage then only decodes samples.
  """
  first = first_stage.from_config(config)
  if first is None:
    images = load_dataset(config.data, channels=config.model.channels)
    return images, None, images
  data_config = config.data.copy_and_resolve_references()
  data_config.image_size = first_stage.image_size(config)
  images = load_dataset(data_config, channels=first.config.in_channels)
  latents = first_stage.latent_dataset(first, images, config.first_stage.encode_batch_size)
  logging.info(
    "Latent diffusion: %s images -> %s latents (%s first stage, scale factor %g)",
    images.train.shape[1:],
    latents.train.shape[1:],
    first.config.kind,
    first.config.scale_factor,
  )
  return images, first, latents


def teacher_stage(job: Job) -> Any:
  """The FP teacher's params on the mesh: loaded from `teacher.source`, else trained here."""
  if not job.config.teacher.source:
    return fp_stage.train_teacher(job)
  teacher_config, params = load_teacher(job.config.teacher.source)
  assert_same_architecture(job.config.model, teacher_config, job.config.data.image_size)
  return jax.device_put(params, sharding.tree_shardings(params, job.mesh))


def export_stage(job: Job, student_model: nn.Module, student_state: Any) -> None:
  """Writes WORKDIR/efficiency.json and WORKDIR/export, the bit-packed student (EMA params).

  With several processes the params may be split over hosts; export from the checkpoint on one
  host instead (`python -m binarydm_jax.export --workdir=WORKDIR`).
  """
  if jax.process_index() == 0:  # What the 1-bit student saves, from the model's own shapes.
    efficiency.write_json(job.config, epath.Path(job.workdir) / "efficiency.json")
  if jax.process_count() > 1:
    logging.info("Several processes: run `python -m binarydm_jax.export --workdir=%s`", job.workdir)
    return
  manifest = export.export_student(
    job.config,
    jax.device_get(student_state.ema_params),
    epath.Path(job.workdir) / "export",
    first_stage=job.first_stage,
    model=student_model,
    fp_dtype=job.config.export.fp_dtype,
    quant_dtype=job.config.export.quant_dtype,
    step=int(jax.device_get(student_state.step)),
  )
  logging.info(
    "1-bit export: %d bytes, %.1fx smaller than FP32",
    manifest["export_bytes"],
    manifest["size_saving"],
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the whole job in `workdir` and returns the contents of WORKDIR/eval.json.

  Raises:
    Preempted: SIGTERM during a training stage, which saved a checkpoint at its current step;
      nothing after the stage ran. Calling again resumes.
  """
  job = setup_job(config, workdir)
  teacher_params = teacher_stage(job)
  teacher_id = config.teacher.source or f"step {config.training.num_steps}"
  results = {"teacher": job.evaluate("teacher", teacher_params, job.model, teacher_id)}
  evaluator.write_results(results, workdir)
  if config.qat.method != "fp":
    student_model, student_state = qat_stage.train_student(job, teacher_params)
    student_id = f"step {config.qat.num_steps}"
    scores = job.evaluate("student", student_state.ema_params, student_model, student_id)
    results["student"] = scores | student.describe_student(config)
    evaluator.write_results(results, workdir)
    export_stage(job, student_model, student_state)
  job.writer.flush()
  return results


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of orbax (several lines per checkpoint); warnings still pass."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def run_command(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`run` as `python -m binarydm_jax.main` does it: quiet orbax, holding the workdir's lock.

  A preempted job (SIGTERM) logs where it saved and returns: nothing was evaluated or exported,
  and rerunning the same command resumes the stage.

  Raises:
    UserError: a bad config, a missing prerequisite, a workdir in use, a NaN loss, ... (one line).
  """
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info(
    "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )
  try:
    with workdir_lock.hold(workdir):
      run(config, workdir)
  except Preempted as e:
    logging.warning("%s", e)


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`section.key -> value` with non-scalar values as strings, for TensorBoard's hparams."""
  flat = {}
  for section, values in config.to_dict().items():
    for key, value in values.items():
      scalar = isinstance(value, bool | int | float | str)
      flat[f"{section}.{key}"] = value if scalar else str(value)
  return flat
