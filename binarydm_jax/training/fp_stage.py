"""The full-precision training stage: the FP train step, its sharded init, and the teacher stage.

Sections follow big_vision's order: sharded init -> step -> loop; `pipeline` runs the stages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from jax.sharding import Mesh

from binarydm_jax import diffusion
from binarydm_jax.runtime import sharding
from binarydm_jax.training import optim
from binarydm_jax.training.job import Job
from binarydm_jax.training.loop import Stage, run_stage
from binarydm_jax.training.train_state import (
  TrainState,
  create_train_state,
  ema_decay_at,
  ema_update,
)

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


def train_teacher(job: Job) -> Any:
  """Trains the FP model in WORKDIR/teacher (resuming if possible); returns its EMA params."""
  config = job.config
  state, step_fn = make_teacher(config, job.mesh, job.model, job.schedule, job.image_shape)
  sampler = job.sampler(job.model)
  stage = Stage(
    name="teacher",
    directory=str(epath.Path(job.workdir) / "teacher"),
    num_steps=config.training.num_steps,
    batch_size=config.training.batch_size,
    step_fn=step_fn,
    on_sample=job.on_sample("teacher", sampler),
  )
  state = run_stage(stage, state, config, job.dataset, job.mesh, job.writer)
  return state.ema_params
