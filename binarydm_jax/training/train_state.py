"""The training state: step, params, optimizer state, EMA params and the base PRNG key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything needed to resume training exactly.

  `rng` is a raw uint32 base key; the key of step s is `fold_in(rng, s)`, so randomness depends
  on the step only and a resumed run repeats an uninterrupted one.
  """

  step: jnp.ndarray
  params: Any
  opt_state: optax.OptState
  ema_params: Any
  rng: jnp.ndarray

  def step_rng(self) -> jax.Array:
    """The PRNG key of the current step."""
    return jax.random.fold_in(self.rng, self.step)

  def apply_gradients(
    self, grads: Any, tx: optax.GradientTransformation, ema_of: Callable[[Any], Any]
  ) -> TrainState:
    """The state after one optimizer update: step + 1, new params and `ema_of(new params)`.

    `ema_of` is the caller's EMA rule (the FP and QAT stages average differently).
    """
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(
      step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema_of(params)
    )


def create_train_state(
  params: Any, tx: optax.GradientTransformation, rng: jnp.ndarray
) -> TrainState:
  """A fresh state at step 0 whose EMA starts at the initial params."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema_params=params,
    rng=rng,
  )


def ema_decay_at(step: jnp.ndarray, decay: float, warmup: bool) -> jnp.ndarray:
  """The EMA decay at `step`: `decay`, or with warmup min(decay, (1 + step) / (10 + step)).

  The warmup keeps short runs from sampling with params that are mostly the random init.
  """
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params: Any, params: Any, decay: jnp.ndarray | float) -> Any:
  """Exponential moving average: ema <- decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
