"""Preemption: on SIGTERM a stage finishes its step, checkpoints it and the job exits 0.

Cloud TPU and SLURM send SIGTERM before they take a machine. With several processes
(`jax.distributed`), JAX's preemption service catches the signal on any host and all processes
agree on the step to save at (orbax's `CheckpointManager.reached_preemption`). A single process
has no such service (the sync point is always False), so `SigtermWatch` installs its own handler
while a stage runs.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import jax
import orbax.checkpoint as ocp
from absl import logging


class Preempted(Exception):
  """A stage saved a checkpoint after SIGTERM: the job stops and exits 0 (not an error); rerunning
  the same command resumes."""

  def __init__(self, stage: str, step: int, directory: str):
    super().__init__(
      f"{stage}: preempted (SIGTERM), checkpoint saved at step {step} in {directory}; "
      "rerun the same command to resume from it"
    )


class SigtermWatch:
  """Context manager: while open, SIGTERM sets a flag instead of killing the process.

  Only installed in a single process's main thread (with `jax.distributed` the preemption service
  owns SIGTERM); the previous handler is restored on exit. A second SIGTERM changes nothing.
  """

  def __init__(self):
    self.received = False
    self._previous = None
    self._installed = False

  def __enter__(self) -> SigtermWatch:
    if (
      not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread()
    ):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(
    self,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    traceback: TracebackType | None,
  ) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    if not self.received:
      logging.warning("SIGTERM: finishing the current step, then saving a checkpoint")
    self.received = True

  def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether to save at `step` and stop; call it after every step (the multi-host sync needs it)."""
    return manager.reached_preemption(step) or self.received
