"""The training loop of one stage: resume, step, log, checkpoint, sample; shared by every stage."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from binarydm_jax.data.input_pipeline import ImageDataset
from binarydm_jax.errors import UserError
from binarydm_jax.runtime import lazy_imports, sharding
from binarydm_jax.training import checkpointing
from binarydm_jax.training.preemption import Preempted, SigtermWatch

if TYPE_CHECKING:
  from clu import metric_writers

StepFn = Callable[[Any, jax.Array], tuple[Any, dict[str, jax.Array]]]


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept and nothing is saved."""


@dataclasses.dataclass(frozen=True)
class Stage:
  """One resumable training stage (e.g. the FP teacher) living in its own checkpoint directory."""

  name: str
  directory: str
  num_steps: int
  batch_size: int
  step_fn: StepFn
  on_sample: Callable[[Any, int], None]
  # Config sections (or `section.key`s) that a checkpoint of this stage must agree with. The
  # image size decides which levels get attention (model.attn_resolutions), i.e. the param tree.
  structural_keys: tuple[str, ...] = ("model", "diffusion", "data.image_size")
  learning_rate_key: str = "optim.learning_rate"  # Named in the advice of a NaN-loss error.
  # step -> f(state) -> state, applied before that step runs (e.g. the EBB switch's handover); a
  # run resumed past the step has it in its checkpoint already.
  transitions: Mapping[int, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
  sample_steps: tuple[int, ...] = ()  # Extra steps at which `on_sample` runs.


def _summarise(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Means of the metrics gathered since the last summary."""
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _check_finite(
  stage: Stage, step: int, metrics: dict[str, float], last_saved: int | None
) -> None:
  # A NaN gradient (its norm) poisons the params even when the loss of that step was finite.
  for key in ("loss", "grad_norm"):
    if key in metrics and not math.isfinite(metrics[key]):
      raise NonFiniteLossError(
        f"{stage.name}: {key} is {metrics[key]} at step {step}; nothing was saved after it "
        f"(last checkpoint: step {last_saved}). Lower --config.{stage.learning_rate_key} or "
        "check the data, then rerun the same command to resume from that checkpoint."
      )


def run_stage(
  stage: Stage,
  state: Any,
  config: ml_collections.ConfigDict,
  dataset: ImageDataset,
  mesh: Mesh,
  writer: metric_writers.MetricWriter,
) -> Any:
  """Trains `state` to `stage.num_steps`, resuming from the stage's latest checkpoint if any.

  The batch and randomness of step s depend only on s, so a run killed at any moment and
  restarted reproduces the uninterrupted run.

  Raises:
    Preempted: SIGTERM arrived; the step in progress finished and its checkpoint is committed.
  """
  training = config.training
  manager = checkpointing.make_manager(stage.directory, training.keep_checkpoints)
  restored = checkpointing.restore_latest(manager, state, config, stage.structural_keys)
  state = state if restored is None else restored
  start = int(jax.device_get(state.step))
  last_saved = manager.latest_step()
  if start >= stage.num_steps:
    logging.info("%s: already trained (%d steps)", stage.name, start)
    return state
  logging.info("%s: training steps %d -> %d", stage.name, start, stage.num_steps)

  # Steps/s and ETA every log_every steps (not every minute: a report right after a long sampling
  # pause would divide one step by its duration), with the share of time spent sampling/saving.
  progress = lazy_imports.periodic_actions().ReportProgress(
    num_train_steps=stage.num_steps, writer=writer, every_steps=training.log_every, every_secs=None
  )
  reporting = jax.process_index() == 0

  def timed(part: str) -> contextlib.AbstractContextManager:
    return progress.timed(part, wait_jax_async_dispatch=False) if reporting else nullcontext()

  pending: list[dict[str, jax.Array]] = []
  # Closing the manager (also on an error such as NonFiniteLossError) commits the async saves
  # still in flight, so the last checkpoint named in the error exists.
  with SigtermWatch() as sigterm, lazy_imports.metric_writers().ensure_flushes(writer), manager:
    for step in range(start, stage.num_steps):
      if step in stage.transitions:
        state = stage.transitions[step](state)
      local = dataset.batch(step, stage.batch_size)
      with jax.profiler.StepTraceAnnotation(stage.name, step_num=step):
        state, metrics = stage.step_fn(state, sharding.global_batch(local, mesh))
      pending.append(metrics)
      done = step + 1
      if reporting:
        progress(done)
      is_last = done == stage.num_steps
      preempted = sigterm.reached(manager, done)
      saves = done % training.checkpoint_every == 0 or is_last or preempted
      if done % training.log_every == 0 or saves:
        summary = _summarise(pending)
        pending = []
        _check_finite(stage, done, summary, last_saved)
        writer.write_scalars(done, {f"{stage.name}/{k}": v for k, v in summary.items()})
        logging.info("%s step %d: %s", stage.name, done, summary)
      if saves:
        with timed("checkpoint"):
          checkpointing.save(manager, done, state, config)
        last_saved = done
      if preempted:  # Committed before the job exits; no sampling: the machine is about to go.
        manager.wait_until_finished()
        raise Preempted(stage.name, done, stage.directory)
      if done % training.sample_every == 0 or is_last or done in stage.sample_steps:
        with timed("sampling"):
          stage.on_sample(state, done)
  return state
