"""The QAT optimizer: `optax.partition` over labelled param groups, with basis evolution (EBB).

Groups come from `quant.param_group`: latent kernels, first-order scales, higher-order scales,
activation steps and the rest (biases, norms). All are trained with Adam; the higher-order scales
(sigma_II, sigma_III) additionally evolve away (paper §3.2):

- stage 1 (step < switch): `paper` form: only the loss term L_EBB = tau * mean_i sigma_II^i
  (`ebb_penalty`) pushes them down; `decoupled` form: a shrinkage applied outside Adam's
  normalisation, with an envelope that guarantees |sigma| <= target * |sigma_0| at the switch;
- stage 2 (step >= switch): the update is -params, so the scales become exactly 0 at the switch
  and stay 0: the model is a pure single-basis 1-bit network from then on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from binarydm_jax.quant import param_labels
from binarydm_jax.training import optim

REGULARIZERS = ("paper", "decoupled", "none")
LR_SCHEDULES = ("constant", "cosine_stage2")
EBB_REDUCTIONS = ("mean", "sum")


class EvolveState(NamedTuple):
  """Step counter and |sigma| at the start of QAT (for the decoupled envelope)."""

  count: jnp.ndarray
  initial_magnitude: Any


def evolve_higher_scales(
  inner: optax.GradientTransformation, switch_step: int, form: str, target_ratio: float
) -> optax.GradientTransformation:
  """Wraps `inner` (Adam) for the higher-order scales: shrink in stage 1, exactly 0 in stage 2."""
  if form not in REGULARIZERS:
    raise ValueError(f"config.qat.ebb_form={form!r}: expected one of {REGULARIZERS}")
  # Per-step multiplicative decay that reaches `target_ratio` after `switch_step` steps.
  decay = target_ratio ** (1.0 / max(switch_step, 1))

  def init(params):
    return (
      EvolveState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.abs, params)),
      inner.init(params),
    )

  def update(updates, state, params):
    evolve, inner_state = state
    updates, inner_state = inner.update(updates, inner_state, params)
    if form == "decoupled":
      envelope = decay ** (evolve.count + 1).astype(jnp.float32)

      def shrink(u, p, p0):
        new = jnp.clip(decay * (p + u), -envelope * p0, envelope * p0)
        return new - p

      updates = jax.tree.map(shrink, updates, params, evolve.initial_magnitude)
    collapsed = evolve.count >= switch_step
    updates = jax.tree.map(lambda u, p: jnp.where(collapsed, -p, u), updates, params)
    return updates, (evolve._replace(count=evolve.count + 1), inner_state)

  return optax.GradientTransformation(init, update)


def learning_rate_schedule(
  qat_config: ml_collections.ConfigDict, switch_step: int
) -> optax.Schedule:
  """Warmup to `qat.learning_rate`, then constant (`lr_schedule='constant'`, the released code), or
  constant until `switch_step` and a cosine to 0 at `num_steps` (`'cosine_stage2'`).

  `switch_step` is the EBB switch; methods without EBB get the same schedule, so that a baseline
  and a BinaryDM run of the same length see the same learning rates.
  """
  if qat_config.lr_schedule not in LR_SCHEDULES:
    raise ValueError(
      f"config.qat.lr_schedule={qat_config.lr_schedule!r}: expected one of {LR_SCHEDULES}"
    )
  warmup = optim.learning_rate_schedule(qat_config)
  if qat_config.lr_schedule == "constant":
    return warmup
  decay = optax.cosine_decay_schedule(
    qat_config.learning_rate, max(qat_config.num_steps - switch_step, 1)
  )
  return optax.join_schedules([warmup, decay], [switch_step])


def act_learning_rate(
  qat_config: ml_collections.ConfigDict, learning_rate: optax.ScalarOrSchedule
) -> optax.ScalarOrSchedule:
  """The rate of the activation quantizers' params: `learning_rate` scaled to
  `qat.act_learning_rate` (-1: the same rate)."""
  act = qat_config.get("act_learning_rate", -1.0)
  if act == -1:
    return learning_rate
  ratio = act / qat_config.learning_rate
  if callable(learning_rate):
    return lambda step: ratio * learning_rate(step)
  return ratio * learning_rate


def make_qat_optimizer(
  qat_config: ml_collections.ConfigDict, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
  """clip_by_global_norm -> optax.partition (alias multi_transform) over the param groups."""

  def adam(rate: optax.ScalarOrSchedule = learning_rate):
    return optax.adamw(
      rate, b1=qat_config.b1, b2=qat_config.b2, weight_decay=qat_config.weight_decay
    )

  transforms = {
    "kernel": adam(),
    "scale_first": adam(),
    "act_quant": adam(act_learning_rate(qat_config, learning_rate)),
    "other": adam(),
    "scale_higher": evolve_higher_scales(
      adam(), qat_config.switch_step, qat_config.ebb_form, qat_config.ebb_target_ratio
    ),
  }
  return optax.chain(
    optax.clip_by_global_norm(qat_config.grad_clip),
    optax.partition(transforms, param_labels),
  )


def higher_scales(params: Any) -> list[jnp.ndarray]:
  """The sigma_II, sigma_III, ... leaves of `params`, one array per layer and basis."""
  labels = param_labels(params)
  return [
    p
    for p, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True)
    if label == "scale_higher"
  ]


def ebb_penalty(params: Any, reduction: str = "mean", absolute: bool = False) -> jnp.ndarray:
  """(1/N) sum_i sigma_II^i over the N layers with higher-order scales (paper Eq. 9, without tau).

  sigma_II is per output channel and the paper leaves its reduction unspecified: each layer
  contributes its channel `reduction` ('mean', or 'sum': C times the pull on every channel).
  As printed the term is signed, so it is unbounded below: a pull strong enough takes sigma_II
  through 0 to large negative values. `absolute` penalises |sigma_II| instead (minimum at 0).
  Zero when no layer has higher-order scales.
  """
  if reduction not in EBB_REDUCTIONS:
    raise ValueError(f"config.qat.ebb_reduction={reduction!r}: expected one of {EBB_REDUCTIONS}")
  reduce = jnp.mean if reduction == "mean" else jnp.sum
  scales = higher_scales(params)
  if not scales:
    return jnp.zeros(())
  return jnp.mean(jnp.stack([reduce(jnp.abs(s) if absolute else s) for s in scales]))


def mean_abs_higher_scale(params: Any) -> jnp.ndarray:
  """Mean |sigma_II| over layers, for logging the evolution."""
  scales = higher_scales(params)
  if not scales:
    return jnp.zeros(())
  return jnp.mean(jnp.stack([jnp.mean(jnp.abs(s)) for s in scales]))
