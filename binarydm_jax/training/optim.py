"""Optimizer of the FP teacher: Adam with linear warmup and global-norm gradient clipping (DDPM)."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(optim_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then constant."""
  return optax.linear_schedule(0.0, optim_config.learning_rate, max(optim_config.warmup_steps, 1))


def make_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm -> Adam(schedule), as in DDPM's training script."""
  return optax.chain(
    optax.clip_by_global_norm(optim_config.grad_clip),
    optax.adam(learning_rate_schedule(optim_config), b1=optim_config.b1, b2=optim_config.b2),
  )
