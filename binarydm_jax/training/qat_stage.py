"""The BinaryDM student stage: quantization-aware training from a frozen FP teacher.

student = binarize(teacher) under the quantization policy; loss = L_simple + L_EBB (paper form,
stage 1) + lambda * L_LRM (paper Eq. 15). The teacher's params enter the jitted step as a separate,
non-donated argument; the student state is donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import Mesh

from binarydm_jax import diffusion
from binarydm_jax.data.input_pipeline import ImageDataset
from binarydm_jax.quant import binarize, with_policy
from binarydm_jax.quant.policy import QuantPolicy
from binarydm_jax.runtime import sharding
from binarydm_jax.student import (
  QATSettings,
  collapse_higher_scales,
  resolve_settings,
  student_policy,
)
from binarydm_jax.training import lrm, qat_optim, switch
from binarydm_jax.training.job import Job
from binarydm_jax.training.loop import Stage, run_stage
from binarydm_jax.training.train_state import TrainState, ema_decay_at, ema_update

if TYPE_CHECKING:
  from clu import metric_writers

# What a student checkpoint must agree with to be resumed (the number of steps may grow).
STRUCTURAL_KEYS = (
  "model",
  "diffusion",
  "data.image_size",
  "quant",
  "qat.method",
  "qat.ebb",
  "qat.lrm",
  "qat.ebb_form",
  "qat.lrm_axis",
  "qat.lrm_reduction",
)
CALIBRATION_SEED = 7  # Fixed: the student's starting point does not depend on the run's seed.


@flax.struct.dataclass
class QATState(TrainState):
  """TrainState plus the fixed LRM projections (block name -> (dim, rank); empty without LRM)."""

  projections: Any = None


def student_ema(
  state: QATState, params: Any, qat_config: ml_collections.ConfigDict, settings: QATSettings
) -> Any:
  """The EMA after step `state.step`, whose update produced `params`.

  The step numbered `switch_step` removes the higher bases (from the params and the EMA alike).
  With `ema_restart_at_switch` the EMA restarts there from the single-basis params, so it never
  averages in weights that were trained next to a second basis (its warmup counts from the switch).
  """
  age = state.step
  restart = jnp.zeros((), bool)
  if settings.ebb and qat_config.ema_restart_at_switch:
    restart = state.step == settings.switch_step
    age = jnp.where(state.step > settings.switch_step, state.step - settings.switch_step, age)
  decay = ema_decay_at(age, qat_config.ema_decay, qat_config.ema_warmup)
  ema = ema_update(state.ema_params, params, jnp.where(restart, 0.0, decay))
  return collapse_higher_scales(ema, state.step >= settings.switch_step)


def make_qat_step(
  student: nn.Module,
  teacher: nn.Module,
  schedule: diffusion.Schedule,
  tx: optax.GradientTransformation,
  lr_fn: optax.Schedule,
  qat_config: ml_collections.ConfigDict,
  settings: QATSettings,
):
  """The QAT step `(state, teacher_params, batch) -> (state, metrics)`; `lr_fn` is `tx`'s schedule."""
  paper_penalty = settings.ebb and qat_config.ebb_form == "paper"

  def qat_step(state: QATState, teacher_params: Any, batch: jax.Array):
    noise_rng, dropout_rng = jax.random.split(state.step_rng())
    x_t, t, noise = diffusion.noisy_inputs(schedule, batch, noise_rng)
    stage1 = state.step < settings.switch_step
    if settings.lrm:
      _, teacher_vars = teacher.apply(
        {"params": teacher_params}, x_t, t, train=False, mutable=["intermediates"]
      )
      teacher_features = jax.lax.stop_gradient(lrm.block_features(teacher_vars["intermediates"]))

    def loss_fn(params):
      eps, student_vars = student.apply(
        {"params": params},
        x_t,
        t,
        train=True,
        rngs={"dropout": dropout_rng},
        mutable=["intermediates"],
      )
      terms = {"loss_simple": diffusion.eps_mse(eps, noise)}
      total = terms["loss_simple"]
      if paper_penalty:
        penalty = qat_optim.ebb_penalty(params, qat_config.ebb_reduction, qat_config.ebb_absolute)
        terms["loss_ebb"] = qat_config.ebb_tau * penalty * stage1
        total = total + terms["loss_ebb"]
      if settings.lrm:
        terms["loss_lrm"] = lrm.lrm_loss(
          lrm.block_features(student_vars["intermediates"]),
          teacher_features,
          state.projections,
          qat_config.lrm_axis,
        )
        total = total + qat_config.lrm_weight * terms["loss_lrm"]
      return total, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(
      grads, tx, lambda params: student_ema(state, params, qat_config, settings)
    )
    metrics = {
      "loss": loss,
      **terms,
      "grad_norm": optax.tree.norm(grads),
      "mean_abs_sigma_II": qat_optim.mean_abs_higher_scale(new_state.params),
      "ebb_stage": jnp.where(stage1, 1, 2),
      "learning_rate": lr_fn(state.step),
    }
    return new_state, metrics

  return qat_step


def jit_qat_step(qat_step, mesh: Mesh, state: QATState, teacher_params: Any):
  """Compiles the step: student state donated, teacher params a separate non-donated input."""
  state_sharding = sharding.tree_shardings(state, mesh)
  return jax.jit(
    qat_step,
    in_shardings=(
      state_sharding,
      sharding.tree_shardings(teacher_params, mesh),
      sharding.data_sharding(mesh),
    ),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


def noised_batches(
  dataset: ImageDataset, schedule: diffusion.Schedule, mesh: Mesh, count: int, batch_size: int
) -> list[tuple[jax.Array, jax.Array]]:
  """`count` deterministic (x_t, t) batches of real training data (random t): the LRM PCA
  projections and the switch report are fitted and measured on them."""
  out = []
  for i in range(count):
    x0 = sharding.global_batch(dataset.batch(i, batch_size), mesh)
    x_t, t, _ = diffusion.noisy_inputs(
      schedule, x0, jax.random.fold_in(jax.random.PRNGKey(CALIBRATION_SEED), i)
    )
    out.append((x_t, t))
  return out


def calibration_batch(
  dataset: ImageDataset,
  schedule: diffusion.Schedule,
  mesh: Mesh,
  count: int,
  batch_size: int,
) -> tuple[jax.Array, jax.Array]:
  """`count` batches of real training data as one (x_t, t), at timesteps spread evenly over 0..T-1.

  The calibration data of the activation steps: every timestep range is represented (a random t
  per sample leaves ranges empty, which timestep-grouped steps cannot fit).
  """
  # t and noise of every global row from one seed, each process keeping its rows: the calibration
  # data do not depend on how many processes share the batch.
  num = count * batch_size
  rng = np.random.default_rng(CALIBRATION_SEED)
  t = rng.permutation((np.arange(num) + rng.uniform(size=num)) * schedule.num_timesteps / num)
  share = batch_size // jax.process_count()
  first = jax.process_index() * share
  rows = np.concatenate([i * batch_size + first + np.arange(share) for i in range(count)])
  x0 = np.concatenate([dataset.batch(i, batch_size) for i in range(count)])  # This process's rows.
  noise = rng.standard_normal((num, *x0.shape[1:])).astype(np.float32)[rows]
  t = t.astype(np.int32)[rows]
  x_t = np.asarray(diffusion.q_sample(schedule, jnp.asarray(x0), jnp.asarray(t), noise))
  return sharding.global_batch(x_t, mesh), sharding.global_batch(t, mesh)


def fit_lrm_projections(
  teacher: nn.Module, teacher_params: Any, batches, qat_config: ml_collections.ConfigDict
) -> dict[str, jax.Array]:
  """PCA projections of the teacher's block outputs on the first batches, kept fixed afterwards."""

  @jax.jit
  def features(x_t, t):
    _, variables = teacher.apply(
      {"params": teacher_params}, x_t, t, train=False, mutable=["intermediates"]
    )
    return lrm.block_features(variables["intermediates"])

  return lrm.fit_projections(
    [features(x_t, t) for x_t, t in batches], qat_config.lrm_reduction, qat_config.lrm_axis
  )


def init_qat_state(
  student: nn.Module,
  teacher: nn.Module,
  teacher_params: Any,
  policy: QuantPolicy,
  tx: optax.GradientTransformation,
  batches,
  config: ml_collections.ConfigDict,
  settings: QATSettings,
  mesh: Mesh,
  calibration: tuple[jax.Array, jax.Array] | None = None,
) -> QATState:
  """Student params from the teacher (binarize + calibration), LRM projections, optimizer state.

  `calibration` (x_t, t) calibrates the activation steps; None = the first of `batches`.
  """
  params = binarize(teacher_params, policy, calibration or batches[0], model=teacher)
  projections = (
    fit_lrm_projections(teacher, teacher_params, batches, config.qat) if settings.lrm else {}
  )

  def init(params, projections):
    return QATState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=params,
      rng=jax.random.PRNGKey(config.qat.seed),
      projections=projections,
    )

  abstract = jax.eval_shape(init, params, projections)
  return jax.jit(init, out_shardings=sharding.tree_shardings(abstract, mesh))(params, projections)


@dataclasses.dataclass(frozen=True)
class Student:
  """A student ready to train: the quantized model, its initial state and the jitted QAT step."""

  model: nn.Module
  state: QATState
  step: Any  # (state, teacher_params, batch) -> (state, metrics), compiled on the mesh.
  settings: QATSettings
  batches: list[tuple[jax.Array, jax.Array]]  # The PCA batches (x_t, t), also the switch's.
  calibration: tuple[jax.Array, jax.Array]  # What calibrates the activation steps (x_t, t).


def make_student(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  dataset: ImageDataset,
  teacher: nn.Module,
  teacher_params: Any,
  schedule: diffusion.Schedule,
) -> Student:
  """binarize(teacher) under the policy, LRM projections, the QAT optimizer and the jitted step."""
  settings = resolve_settings(config.qat, config.quant)
  image_shape = dataset.train.shape[1:]
  policy = student_policy(config, settings, teacher, image_shape)
  student = with_policy(teacher, policy)
  lr = qat_optim.learning_rate_schedule(config.qat, settings.switch_step)
  qat_config = ml_collections.ConfigDict(config.qat.to_dict())
  qat_config.switch_step = settings.switch_step
  if not settings.ebb:
    qat_config.ebb_form = "none"
  tx = qat_optim.make_qat_optimizer(qat_config, lr)
  sharding.check_batch_divisible(config.qat.batch_size, mesh, "config.qat.batch_size")
  batches = noised_batches(
    dataset, schedule, mesh, max(config.qat.lrm_num_batches, 1), config.qat.batch_size
  )
  calibration = calibration_batch(
    dataset, schedule, mesh, config.quant.get("calib_batches", 1), config.qat.batch_size
  )
  state = init_qat_state(
    student, teacher, teacher_params, policy, tx, batches, config, settings, mesh, calibration
  )
  step = jit_qat_step(
    make_qat_step(student, teacher, schedule, tx, lr, qat_config, settings),
    mesh,
    state,
    teacher_params,
  )
  return Student(
    model=student,
    state=state,
    step=step,
    settings=settings,
    batches=batches,
    calibration=calibration,
  )


def switch_transition(
  student: Student,
  qat_config: ml_collections.ConfigDict,
  writer: metric_writers.MetricWriter,
  on_switch: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[QATState], QATState]:
  """What runs before the step numbered `switch_step`: the switch report and the handover.

  The report (logged, written to TensorBoard and passed to `on_switch`) holds mean|sigma_II| and
  mean|sigma_II| / mean|sigma_I| of the two-basis student, and the relative change of every
  block's output on the calibration batches when sigma_II is dropped (`block_change`) and, with a
  handover, when the handover's params replace it (`block_change_handover`).
  """
  step = student.settings.switch_step

  def transition(state: QATState) -> QATState:
    two_basis = state.params
    report = {
      "step": step,
      "mean_abs_sigma_II": float(qat_optim.mean_abs_higher_scale(two_basis)),
      "sigma_II_over_sigma_I": switch.higher_to_first_ratio(two_basis),
      "block_change": switch.block_change(
        student.model, two_basis, switch.collapse(two_basis), student.batches
      ),
    }
    scalars = {
      "student/switch_sigma_II_over_sigma_I": report["sigma_II_over_sigma_I"],
      "student/switch_eps_change": report["block_change"]["eps"],
    }
    if qat_config.switch_handover != "none":
      params = switch.handover(
        student.model, two_basis, [student.calibration], qat_config.switch_handover
      )
      report["block_change_handover"] = switch.block_change(
        student.model, two_basis, params, student.batches
      )
      scalars["student/switch_eps_change_handover"] = report["block_change_handover"]["eps"]
      state = state.replace(
        params=jax.device_put(params, jax.tree.map(lambda p: p.sharding, two_basis))
      )
    logging.info("EBB switch before step %d: %s", step, report)
    writer.write_scalars(step, scalars)
    if on_switch is not None:
      on_switch(report)
    return state

  return transition


def train_student(
  job: Job,
  teacher_params: Any,
  on_switch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[nn.Module, Any]:
  """Runs QAT of `job.model` in WORKDIR/student (resuming if possible); returns (student model,
  final state).

  Sample with the state's `ema_params` (the job does); `params` are the raw, non-averaged ones.
  With EBB, samples are also taken at the switch step S (the two-basis student) and at S + 1
  (the single-basis student that step S + 1 starts from, EMA restarted), and `switch_transition`
  runs before step S (`on_switch` gets its report).
  """
  config = job.config
  student = make_student(config, job.mesh, job.dataset, job.model, teacher_params, job.schedule)
  switch_step = student.settings.switch_step
  evolves = student.settings.ebb and switch_step < config.qat.num_steps
  sampler = job.sampler(student.model)
  stage = Stage(
    name="student",
    directory=str(epath.Path(job.workdir) / "student"),
    num_steps=config.qat.num_steps,
    batch_size=config.qat.batch_size,
    step_fn=lambda state, batch: student.step(state, teacher_params, batch),
    structural_keys=STRUCTURAL_KEYS,
    learning_rate_key="qat.learning_rate",
    transitions={switch_step: switch_transition(student, config.qat, job.writer, on_switch)}
    if evolves
    else {},
    sample_steps=(switch_step, switch_step + 1) if evolves else (),
    on_sample=job.on_sample("student", sampler),
  )
  state = run_stage(stage, student.state, config, job.dataset, job.mesh, job.writer)
  return student.model, state
