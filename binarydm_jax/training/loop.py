"""The training loop of one stage: resume, step, log, checkpoint, sample; shared by every stage."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
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


class DivergedLossError(UserError, ArithmeticError):
  """The loss stayed far above its running median; the last checkpoint is kept, nothing saved."""


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


def _summarise(host: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Means of the metrics gathered since the last summary (already on the host)."""
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


class DivergenceGuard:
  """Stops a stage whose loss stays above `factor` x its running median for `steps` steps in a row.

  The median is over the last `window` losses that were not above the line, so a divergence that
  lasts does not raise its own reference; a loss above the line from the first steps on (an absurd
  learning rate) is caught as well. `factor` or `steps` 0 turns the guard off. It sees the losses
  where the loop fetches them for its summaries anyway, so it adds no device-to-host transfer; they
  are replicated, so every process decides alike. A resumed run starts with an empty window.
  """

  def __init__(self, factor: float, steps: int, window: int):
    self.factor, self.steps = factor, steps
    self.enabled = factor > 0 and steps > 0
    self._good: collections.deque[float] = collections.deque(maxlen=window)
    self.rising_since: int | None = None  # First step of the current run of losses above the line.
    self._run = 0

  def observe(self, step: int, loss: float) -> tuple[float, float] | None:
    """Notes the loss of `step`; returns (loss, median) once the run reaches `steps` steps."""
    if not self.enabled or not math.isfinite(loss):  # NaN and inf: `_check_finite`'s.
      return None
    median = float(np.median(self._good)) if self._good else 0.0
    if median > 0 and loss > self.factor * median:
      self._run += 1
      if self.rising_since is None:
        self.rising_since = step
      return (loss, median) if self._run >= self.steps else None
    self._run, self.rising_since = 0, None
    self._good.append(loss)
    return None


def _check_divergence(
  stage: Stage,
  guard: DivergenceGuard,
  first_step: int,
  losses: Sequence[float],
  last_saved: int | None,
) -> None:
  """Feeds the losses of steps `first_step`, `first_step + 1`, ... to `guard`; raises on a trip."""
  for step, loss in enumerate(losses, start=first_step):
    tripped = guard.observe(step, float(loss))
    if tripped is None:
      continue
    loss, median = tripped
    rise = guard.rising_since
    if last_saved is None:
      kept, resume = "there is none yet", "from the start"
    else:
      kept, resume = f"the last is step {last_saved}", "from it"
      if last_saved == rise - 1:  # Its params gave the first loss above the line.
        kept += (
          f" (its params gave the first high loss: if the rerun's loss starts high, move "
          f"{stage.directory}/{last_saved} aside)"
        )
    raise DivergedLossError(
      f"{stage.name}: the loss diverged: {loss:.4g} at step {step} after {guard.steps} steps "
      f"in a row above {guard.factor:g}x its running median {median:.4g} (since step {rise}); "
      f"no checkpoint was written since, {kept}. Lower --config.{stage.learning_rate_key} and "
      f"rerun the same command to resume {resume}, or loosen the guard: "
      "--config.training.divergence_factor or divergence_steps (0 turns it off)"
    )


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
  guard = DivergenceGuard(
    training.divergence_factor, training.divergence_steps, training.divergence_window
  )
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
        host = jax.device_get(pending)
        pending = []
        summary = _summarise(host)
        _check_finite(stage, done, summary, last_saved)
        if "loss" in summary:
          _check_divergence(
            stage, guard, done - len(host) + 1, [m["loss"] for m in host], last_saved
          )
        writer.write_scalars(done, {f"{stage.name}/{k}": v for k, v in summary.items()})
        logging.info("%s step %d: %s", stage.name, done, summary)
      if saves and guard.rising_since is not None and not (is_last or preempted):
        # The loss may be diverging: no periodic checkpoint now, so none of the good ones is
        # replaced by a state that may be bad (the next one comes once the loss is back).
        logging.warning(
          "%s: no checkpoint at step %d: the loss is above %gx its running median since step %d",
          stage.name,
          done,
          guard.factor,
          guard.rising_since,
        )
        saves = False
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
