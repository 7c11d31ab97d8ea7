"""The job: train (or load) the FP teacher, sample, evaluate, and write WORKDIR/eval.json.

Sections follow big_vision's order: mesh -> data -> model -> sharded init -> step -> loop -> eval.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from clu import metric_writers
from etils import epath
from jax.sharding import Mesh

from binarydm_jax import diffusion, efficiency, evaluate, export, optim, qat, sampling, sharding
from binarydm_jax.config_validation import validate_config
from binarydm_jax.input_pipeline import load_dataset
from binarydm_jax.loop import Stage, run_stage
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.teacher import assert_same_architecture, load_teacher
from binarydm_jax.train_state import TrainState, create_train_state, ema_decay_at, ema_update

# fold_in index of the params-init key: steps use fold_in(rng, step) with step < 2**31 - 1.
INIT_STREAM = 2**31 - 1


def make_train_step(
  model: nn.Module,
  schedule: diffusion.Schedule,
  tx: optax.GradientTransformation,
  lr_fn: optax.Schedule,
  optim_config: ml_collections.ConfigDict,
):
  """The FP train step `(state, batch) -> (state, metrics)`: eps-MSE, Adam, EMA."""

  def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    noise_rng, dropout_rng = jax.random.split(state.step_rng())

    def loss_fn(params):
      x_t, t, noise = diffusion.noisy_inputs(schedule, batch, noise_rng)
      eps = model.apply({"params": params}, x_t, t, train=True, rngs={"dropout": dropout_rng})
      return diffusion.eps_mse(eps, noise)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state = state.apply_gradients(
      grads,
      tx,
      lambda params: ema_update(
        state.ema_params,
        params,
        ema_decay_at(state.step, optim_config.ema_decay, optim_config.ema_warmup),
      ),
    )
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": lr_fn(state.step),
    }
    return new_state, metrics

  return train_step


def jit_train_step(train_step, mesh: Mesh, state: TrainState):
  """Compiles a step with the donated state in its fsdp/replicated shardings and the batch split."""
  state_sharding = sharding.tree_shardings(state, mesh)
  return jax.jit(
    train_step,
    in_shardings=(state_sharding, sharding.data_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


def init_train_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, int, int],
  seed: int,
  mesh: Mesh,
) -> TrainState:
  """Initialises params and optimizer state directly into their shardings (fsdp or replicated)."""
  rng = jax.random.PRNGKey(seed)

  def init():
    params = model.init(
      jax.random.fold_in(rng, INIT_STREAM), jnp.zeros((1, *image_shape)), jnp.zeros((1,), jnp.int32)
    )["params"]
    return create_train_state(params, tx, rng)

  return jax.jit(init, out_shardings=sharding.tree_shardings(jax.eval_shape(init), mesh))()


def sample_callbacks(config: ml_collections.ConfigDict, workdir: str, writer):
  """`make(name, sampler)` -> a callback saving EMA sample grids as DIR/samples/<name>_<step>.png
  and TensorBoard images (the same initial noise every time, so grids are comparable)."""

  def make(name: str, sampler) -> Callable[[TrainState, int], None]:
    def on_sample(state: TrainState, step: int) -> None:
      images = sampler(state.ema_params, jax.random.PRNGKey(0), config.sampling.grid_size)
      grid = sampling.image_grid(images)
      if jax.process_index() == 0:
        sampling.save_png(grid, epath.Path(workdir) / "samples" / f"{name}_{step:07d}.png")
      writer.write_images(step, {f"{name}/samples": grid[None]})

    return on_sample

  return make


def make_teacher(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  model: nn.Module,
  schedule: diffusion.Schedule,
  image_shape: tuple[int, int, int],
) -> tuple[TrainState, Callable]:
  """A fresh FP state (seed `training.seed`) and its jitted, state-donating train step."""
  tx = optim.make_optimizer(config.optim)
  state = init_train_state(model, tx, image_shape, config.training.seed, mesh)
  step = jit_train_step(
    make_train_step(model, schedule, tx, optim.learning_rate_schedule(config.optim), config.optim),
    mesh,
    state,
  )
  return state, step


def train_teacher(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh: Mesh,
  dataset,
  model: nn.Module,
  schedule: diffusion.Schedule,
  writer: metric_writers.MetricWriter,
) -> Any:
  """Trains the FP model in WORKDIR/teacher (resuming if possible); returns its EMA params."""
  image_shape = dataset.train.shape[1:]
  state, step_fn = make_teacher(config, mesh, model, schedule, image_shape)
  sampler = sampling.make_sampler(model, schedule, config.sampling, mesh, image_shape)
  stage = Stage(
    name="teacher",
    directory=str(epath.Path(workdir) / "teacher"),
    num_steps=config.training.num_steps,
    batch_size=config.training.batch_size,
    step_fn=step_fn,
    on_sample=sample_callbacks(config, workdir, writer)("teacher", sampler),
  )
  state = run_stage(stage, state, config, dataset, mesh, writer)
  return state.ema_params


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`section.key -> value` with non-scalar values as strings, for TensorBoard's hparams."""
  flat = {}
  for section, values in config.to_dict().items():
    for key, value in values.items():
      scalar = isinstance(value, bool | int | float | str)
      flat[f"{section}.{key}"] = value if scalar else str(value)
  return flat


def export_final_student(config: ml_collections.ConfigDict, state: Any, workdir: str) -> None:
  """Writes WORKDIR/export, the bit-packed 1-bit student (EMA params), replacing an earlier one.

  With several processes the params may be split over hosts; export from the checkpoint on one
  host instead (`python -m binarydm_jax.export --workdir=WORKDIR`).
  """
  if jax.process_count() > 1:
    logging.info("Several processes: run `python -m binarydm_jax.export --workdir=%s`", workdir)
    return
  manifest = export.export_student(
    (config, jax.device_get(state.ema_params)),
    epath.Path(workdir) / "export",
    config.export.fp_dtype,
    config.export.quant_dtype,
    step=int(jax.device_get(state.step)),
  )
  logging.info(
    "1-bit export: %d bytes, %.1fx smaller than FP32",
    manifest["export_bytes"],
    manifest["size_saving"],
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the whole job in `workdir` and returns the contents of WORKDIR/eval.json.

  Raises:
    Preempted: SIGTERM during a training stage, which saved a checkpoint at its current step;
      nothing after the stage ran. Calling again resumes.
  """
  validate_config(config)
  evaluate.check_ready(config)  # E.g. the Inception weights, before hours of training.
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  # ---------------------------------------------------------------- Mesh
  mesh = sharding.make_mesh(config.mesh)
  for key in ("training.batch_size", "qat.batch_size", "eval.batch_size", "sampling.grid_size"):
    section, field = key.split(".")
    sharding.check_batch_divisible(config[section][field], mesh, f"config.{key}")
  logging.info("Mesh: %s over %d process(es)", dict(mesh.shape), jax.process_count())
  # ---------------------------------------------------------------- Data
  dataset = load_dataset(config.data)
  # ---------------------------------------------------------------- Model
  model = unet_from_config(config.model)
  schedule = diffusion.schedule_from_config(config.diffusion)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0 and not (epath.Path(workdir) / "teacher").exists():
    writer.write_hparams(_flat_hparams(config))
  # ---------------------------------------------------------------- Teacher
  if config.teacher.source:
    teacher_config, teacher_params = load_teacher(config.teacher.source)
    assert_same_architecture(config.model, teacher_config, config.data.image_size)
    teacher_params = jax.device_put(teacher_params, sharding.tree_shardings(teacher_params, mesh))
  else:
    teacher_params = train_teacher(config, workdir, mesh, dataset, model, schedule, writer)
  results = {
    "teacher": evaluate.evaluate_model(
      "teacher",
      teacher_params,
      model,
      schedule,
      config,
      dataset,
      mesh,
      workdir,
      writer,
      model_id=config.teacher.source or f"step {config.training.num_steps}",
    )
  }
  evaluate.write_results(results, workdir)
  # ---------------------------------------------------------------- Student (BinaryDM QAT)
  if config.qat.method != "fp":
    student, student_state = qat.train_student(
      config,
      workdir,
      mesh,
      dataset,
      model,
      teacher_params,
      schedule,
      writer,
      sample_callbacks(config, workdir, writer),
    )
    results["student"] = evaluate.evaluate_model(
      "student",
      student_state.ema_params,
      student,
      schedule,
      config,
      dataset,
      mesh,
      workdir,
      writer,
      model_id=f"step {config.qat.num_steps}",
    ) | qat.describe_student(config)
    evaluate.write_results(results, workdir)
    if jax.process_index() == 0:  # What the 1-bit student saves, from the model's own shapes.
      efficiency.write_json(config, epath.Path(workdir) / "efficiency.json")
    export_final_student(config, student_state, workdir)
  writer.flush()
  return results
