"""Preemption (SIGTERM) and damaged checkpoints: nothing is lost, the rerun resumes.

Fast: the loop with tests/test_train.py's toy stage. Slow: SIGTERM to the real smoke job
(`python -m binarydm_jax.main`) in the teacher and the student stage, then a rerun.
"""

import dataclasses
import errno
import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from binarydm_jax.runtime import sharding
from binarydm_jax.training import checkpointing, loop, qat_stage
from binarydm_jax.training.preemption import Preempted
from binarydm_jax.training.train_state import TrainState
from tests.test_cli import ROOT, main_env
from tests.test_train import (
  _Batches,
  _Recorder,
  _restore_state,
  _scalars,
  _toy_config,
  _toy_stage,
  _toy_state,
)

NUM_STEPS = 6


def _mesh():
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1}))


def _step_fn(on_step=lambda step: None):
  """w <- w / 2 + mean(batch) (the batch of step s is s + 1); the loss depends on w."""

  def step_fn(state, batch):
    on_step(int(state.step))
    params = {"w": state.params["w"] * 0.5 + jnp.mean(batch)}
    metrics = {"loss": jnp.mean(batch) + params["w"][0]}
    return state.replace(step=state.step + 1, params=params, ema_params=params), metrics

  return step_fn


def _uninterrupted(num_steps: int) -> tuple[list[tuple[int, float]], float]:
  """The uninterrupted run's loss after each step (log_every = 1) and its final w."""
  w, losses = 0.0, []
  for s in range(num_steps):
    w = w * 0.5 + (s + 1)
    losses.append((s + 1, float(np.float32(s + 1) + np.float32(w))))
  return losses, w


def _student_state(mesh):
  """A QATState (TrainState plus LRM projections), as the student stage checkpoints."""
  toy = _toy_state(mesh)
  state = qat_stage.QATState(
    **{f.name: getattr(toy, f.name) for f in dataclasses.fields(TrainState)}
  )
  return jax.device_put(
    state.replace(projections={"mid": jnp.ones((3, 2))}), sharding.replicated(mesh)
  )


def _stage(kind, directory, num_steps, step_fn):
  """The toy stage as the teacher stage or the student stage configures it."""
  stage = _toy_stage(str(directory), num_steps, step_fn)
  if kind == "teacher":
    return dataclasses.replace(stage, name="teacher")
  return dataclasses.replace(
    stage,
    name="student",
    structural_keys=qat_stage.STRUCTURAL_KEYS,
    learning_rate_key="qat.learning_rate",
  )


def _run(kind, directory, num_steps, step_fn=None, writer=None):
  mesh = _mesh()
  state = _toy_state(mesh) if kind == "teacher" else _student_state(mesh)
  stage = _stage(kind, directory, num_steps, step_fn or _step_fn())
  return loop.run_stage(stage, state, _toy_config(), _Batches(), mesh, writer or _Recorder())


# ------------------------------------------------------------------------ SIGTERM, in the loop


def test_sigterm_saves_the_step_in_progress_and_the_rerun_continues(tmp_path):
  def outside(signum, frame):
    raise AssertionError("SIGTERM reached the handler from outside the stage")

  def sigterm_twice(step):  # The second one must change nothing.
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)

  directory = tmp_path / "teacher"
  writer = _Recorder()
  original = signal.signal(signal.SIGTERM, outside)
  try:
    with pytest.raises(
      Preempted,
      match=rf"teacher: preempted \(SIGTERM\), checkpoint saved at step 3 in {directory}; rerun",
    ):
      _run("teacher", directory, NUM_STEPS, _step_fn(sigterm_twice), writer)
    assert signal.getsignal(signal.SIGTERM) is outside  # Restored after the stage.
  finally:
    signal.signal(signal.SIGTERM, original)
  # Step 3 (index 2) finished and was committed: no orbax temporary directory is left.
  assert sorted(os.listdir(directory)) == ["2", "3"]
  state = _run("teacher", directory, NUM_STEPS, writer=writer)
  # Steps 1-3 logged before the SIGTERM, 4-6 by the rerun, each once: the uninterrupted losses.
  losses, w = _uninterrupted(NUM_STEPS)
  assert writer.scalars["teacher/loss"] == losses
  np.testing.assert_allclose(state.params["w"], w)


def test_with_jax_distributed_the_orbax_sync_point_decides(tmp_path, monkeypatch):
  """With several processes JAX's preemption service owns SIGTERM; all stop at orbax's step."""
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  asked = []

  def reached_preemption(self, step):
    asked.append(step)
    return step == 3

  monkeypatch.setattr(ocp.CheckpointManager, "reached_preemption", reached_preemption)
  handlers = []
  step_fn = _step_fn(lambda step: handlers.append(signal.getsignal(signal.SIGTERM)))
  directory = tmp_path / "student"
  with pytest.raises(Preempted, match="student: preempted .* step 3"):
    _run("student", directory, NUM_STEPS, step_fn)
  assert set(asked) == {1, 2, 3}  # Every step asks (the sync point needs all processes to).
  assert set(handlers) == {signal.getsignal(signal.SIGTERM)}  # No handler of ours installed.
  assert sorted(os.listdir(directory)) == ["2", "3"]


def test_nan_in_the_preempted_step_is_not_saved(tmp_path):
  def step_fn(state, batch):
    if int(state.step) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
      batch = batch * jnp.nan
    return state.replace(step=state.step + 1), {"loss": jnp.mean(batch)}

  config = _toy_config(log_every=100)  # The NaN is only summarised because the stage stops.
  mesh = _mesh()
  directory = tmp_path / "toy"
  with pytest.raises(
    loop.NonFiniteLossError, match="loss is nan at step 3.*last checkpoint: step 2"
  ):
    loop.run_stage(
      _toy_stage(str(directory), NUM_STEPS, step_fn),
      _toy_state(mesh),
      config,
      _Batches(),
      mesh,
      _Recorder(),
    )
  assert os.listdir(directory) == ["2"]


# ------------------------------------------------------------------------ damaged checkpoints


def _overwrite(path):
  with open(path, "r+b") as f:
    f.write(b"\xff" * 100)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _btree_node(step_dir):
  """The OCDBT node that indexes the state's arrays (and holds the small ones)."""
  (path,) = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  return path


DAMAGES = {
  "overwritten config/metadata": lambda d: _overwrite(os.path.join(d, "config", "metadata")),
  "truncated state/_METADATA": lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
  "overwritten state/d node": lambda d: _overwrite(_btree_node(d)),
  "truncated state/d node": lambda d: _truncate(_btree_node(d)),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_resumed(
  tmp_path, caplog, kind, damage
):
  directory = tmp_path / kind
  _run(kind, directory, 4)  # checkpoints 2 and 4
  DAMAGES[damage](str(directory / "4"))
  writer = _Recorder()
  with caplog.at_level(logging.WARNING):
    state = _run(kind, directory, NUM_STEPS, writer=writer)
  (warning,) = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert warning.startswith(f"Checkpoint {directory}/4 is damaged (") and "4.damaged" in warning
  # Resumed from step 2: steps 3..6 ran, exactly as the uninterrupted run's.
  losses, w = _uninterrupted(NUM_STEPS)
  assert writer.scalars[f"{kind}/loss"] == losses[2:]
  np.testing.assert_allclose(state.params["w"], w)
  # The damaged checkpoint is kept, renamed; orbax lists only the intact ones.
  assert sorted(os.listdir(directory)) == ["2", "4", "4.damaged", "6"]
  assert checkpointing.make_manager(str(directory), 3).all_steps() == [2, 4, 6]


def test_every_damaged_newer_step_is_moved_aside_a_taken_name_gets_a_suffix(tmp_path, caplog):
  directory = tmp_path / "teacher"
  _run("teacher", directory, 4)
  _overwrite(directory / "4" / "config" / "metadata")
  _run("teacher", directory, NUM_STEPS)  # from 2: saves 4 and 6 again
  _truncate(directory / "6" / "state" / "_METADATA")
  _overwrite(directory / "4" / "config" / "metadata")
  writer = _Recorder()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    _run("teacher", directory, NUM_STEPS + 2, writer=writer)
  assert [s for s, _ in writer.scalars["teacher/loss"]] == [3, 4, 5, 6, 7, 8]
  assert sorted(os.listdir(directory)) == ["4", "4.damaged", "4.damaged-2", "6", "6.damaged", "8"]
  damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert [m.split(" is damaged")[0] for m in damaged] == [
    f"Checkpoint {directory}/6",
    f"Checkpoint {directory}/4",
  ]


def test_no_readable_checkpoint_is_one_error_and_nothing_is_renamed(tmp_path):
  """All unreadable may also mean written by another version of the code: nothing is moved."""
  directory = tmp_path / "teacher"
  _run("teacher", directory, 4)
  _overwrite(directory / "4" / "config" / "metadata")
  _truncate(directory / "2" / "state" / "_METADATA")
  with pytest.raises(checkpointing.CheckpointDamagedError) as error:
    _run("teacher", directory, NUM_STEPS)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(
    f"no checkpoint in {directory} can be read (steps [2, 4]; step 4: UnicodeDecodeError: "
  )
  assert message.endswith(f"otherwise move {directory} away to train this stage from scratch")
  assert sorted(os.listdir(directory)) == ["2", "4"]


# ------------------------------------------------------------------------ transient read faults


@pytest.fixture
def waits(monkeypatch):
  """Reads tried 3 times; the waits between them are recorded, not slept."""
  waits = []
  retry = checkpointing.ReadRetry(attempts=3, first_delay_s=0.5, sleep=waits.append)
  monkeypatch.setattr(checkpointing, "READ_RETRY", retry)
  return waits


def _flaky_config_reads(monkeypatch, failures, error=TimeoutError):
  """Orbax's read of a step's config file (epath's read_text) raises `error` on the first
  `failures[step]` reads of that step; returns the steps read, in order."""
  cls = type(epath.Path("/"))
  read_text = cls.read_text
  reads = []

  def flaky(self, *args, **kwargs):
    if self.name == "metadata" and self.parent.name == "config":
      step = int(self.parent.parent.name)
      reads.append(step)
      if reads.count(step) <= failures.get(step, 0):
        raise error(f"reading {self} timed out")
    return read_text(self, *args, **kwargs)

  monkeypatch.setattr(cls, "read_text", flaky)
  return reads


def _flaky_state_reads(monkeypatch, error, failures):
  """The state read of a checkpoint raises `error()` on its first `failures` calls."""
  restore = ocp.CheckpointManager.restore
  calls = []

  def flaky(self, step, *args, **kwargs):
    if "state" in kwargs["args"]:
      calls.append(step)
      if len(calls) <= failures:
        raise error()
    return restore(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
  return calls


def test_a_transient_read_fault_is_retried_and_the_newest_checkpoint_resumed(
  tmp_path, monkeypatch, waits, caplog
):
  directory = tmp_path / "teacher"
  _run("teacher", directory, 4)  # checkpoints 2 and 4
  reads = _flaky_config_reads(monkeypatch, {4: 2})
  writer = _Recorder()
  with caplog.at_level(logging.WARNING):
    state = _run("teacher", directory, NUM_STEPS, writer=writer)
  assert reads == [4, 4, 4] and waits == [0.5, 1.0]
  # Resumed from step 4: steps 5 and 6 ran, as the uninterrupted run's.
  losses, w = _uninterrupted(NUM_STEPS)
  assert writer.scalars["teacher/loss"] == losses[4:]
  np.testing.assert_allclose(state.params["w"], w)
  assert sorted(os.listdir(directory)) == ["2", "4", "6"]  # Nothing renamed.
  messages = [r.getMessage() for r in caplog.records]
  assert not [m for m in messages if "damaged" in m]
  assert len([m for m in messages if m.startswith(f"Reading checkpoint {directory}/4 failed")]) == 2


def _unavailable():
  return ValueError('UNAVAILABLE: Error reading "state/d/x" from gs://bucket: HTTP response 503')


def _connection_reset_inside():
  try:
    raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
  except ConnectionResetError as error:
    raise RuntimeError("restore failed") from error


@pytest.mark.parametrize("error", [_unavailable, _connection_reset_inside])
def test_a_transient_state_read_fault_is_retried(tmp_path, monkeypatch, waits, error):
  """Tensorstore's status codes, and an I/O error the error was raised from, are transient."""
  directory = tmp_path / "student"
  _run("student", directory, 4)
  calls = _flaky_state_reads(monkeypatch, error, failures=1)
  writer = _Recorder()
  _run("student", directory, NUM_STEPS, writer=writer)
  assert calls == [4, 4] and waits == [0.5]
  assert [s for s, _ in writer.scalars["student/loss"]] == [5, 6]
  assert sorted(os.listdir(directory)) == ["2", "4", "6"]


@pytest.mark.parametrize("newest_damaged", [False, True])
def test_a_persistent_read_fault_stops_in_one_line_and_renames_nothing(
  tmp_path, monkeypatch, waits, newest_damaged
):
  """Also when a damaged newer checkpoint was found first: it is not moved aside either."""
  directory = tmp_path / "teacher"
  _run("teacher", directory, 4)
  if newest_damaged:
    _overwrite(_btree_node(str(directory / "4")))
  failing = 2 if newest_damaged else 4
  _flaky_config_reads(monkeypatch, {failing: 10**6})
  with pytest.raises(checkpointing.CheckpointAccessError) as error:
    _run("teacher", directory, NUM_STEPS)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"cannot read checkpoint {directory}/{failing}: TimeoutError: reading ")
  assert "(still failing after 3 tries); nothing was renamed or deleted" in message
  assert message.endswith("then rerun the same command to resume from it")
  assert waits == [0.5, 1.0]
  assert sorted(os.listdir(directory)) == ["2", "4"]
  assert sorted(os.listdir(directory / "4")) == sorted(os.listdir(directory / "2"))


def test_a_damaged_checkpoint_is_not_retried_and_still_moved_aside(
  tmp_path, monkeypatch, waits, caplog
):
  """The newest checkpoint's file does not decode; the older one's first read times out."""
  directory = tmp_path / "teacher"
  _run("teacher", directory, 4)
  _overwrite(directory / "4" / "config" / "metadata")
  reads = _flaky_config_reads(monkeypatch, {2: 1})
  writer = _Recorder()
  with caplog.at_level(logging.WARNING):
    state = _run("teacher", directory, NUM_STEPS, writer=writer)
  assert reads == [4, 2, 2] and waits == [0.5]  # The undecodable file is read once.
  (warning,) = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert warning.startswith(f"Checkpoint {directory}/4 is damaged (UnicodeDecodeError: ")
  losses, w = _uninterrupted(NUM_STEPS)
  assert writer.scalars["teacher/loss"] == losses[2:]
  np.testing.assert_allclose(state.params["w"], w)
  assert sorted(os.listdir(directory)) == ["2", "4", "4.damaged", "6"]


class ServiceUnavailable(Exception):  # google.api_core's 503, by name
  code = 503


class HttpError(Exception):  # gcsfs's, with its HTTP status
  def __init__(self, code):
    super().__init__(f"HTTP {code}")
    self.code = code


class UnavailableError(Exception):  # TensorFlow gfile's, by name
  pass


def _raised_while_handling(outer, inner):
  try:
    try:
      raise inner
    except type(inner):
      raise outer  # noqa: B904 (the implicit context is the point)
  except type(outer) as error:
    return error


@pytest.mark.parametrize(
  "error,transient",
  [
    (TimeoutError("read timed out"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (PermissionError(errno.EACCES, "denied"), True),
    (OSError(errno.EIO, "I/O error"), True),
    (ValueError("UNAVAILABLE: HTTP response 503"), True),
    (ValueError("DEADLINE_EXCEEDED: reading gs://b/x"), True),
    (ValueError("PERMISSION_DENIED: HTTP response 403"), True),
    (ServiceUnavailable("503 Service Unavailable"), True),
    (HttpError(429), True),
    (UnavailableError("socket closed"), True),
    (_raised_while_handling(ValueError("bad"), TimeoutError("slow")), True),
    (FileNotFoundError(errno.ENOENT, "no such file"), False),
    (ValueError("DATA_LOSS: Error reading step/.zarray"), False),
    (ValueError("NOT_FOUND: Error reading step/.zarray"), False),
    (ValueError("OUT_OF_RANGE: Error reading step/.zarray"), False),
    (json.JSONDecodeError("Unterminated string", "{", 0), False),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), False),
    (HttpError(404), False),
    (_raised_while_handling(ValueError("bad"), FileNotFoundError("gone")), False),
  ],
)
def test_is_transient(error, transient):
  assert checkpointing.is_transient(error) is transient


# ------------------------------------------------------------------------ the real job, slow

SMOKE = [
  "--config=configs/digits.py:smoke",  # teacher 20 steps, student 10 (EBB switch at 5)
  "--config.training.log_every=1",
  "--config.training.checkpoint_every=2",
]


def _main(workdir, session_dir, stop_after=None):
  """Runs the smoke job; with `stop_after=(stage, n)`, SIGTERM once the log shows step n of
  that stage. Returns (exit code, log)."""
  args = [
    *SMOKE,
    f"--workdir={workdir}",
    f"--config.eval.cache_dir={session_dir / 'digits_classifier'}",
  ]
  proc = subprocess.Popen(
    [sys.executable, "-m", "binarydm_jax.main", *args],
    cwd=ROOT,
    env=main_env(session_dir),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  watchdog = threading.Timer(1800, proc.kill)  # A whole job: minutes on 2 busy cores
  watchdog.start()
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if stop_after and f"] {stop_after[0]} step {stop_after[1]}: " in line:
      proc.send_signal(signal.SIGTERM)
  proc.wait()
  watchdog.cancel()
  return proc.returncode, "".join(lines)


def _preempted_at(log, stage):
  (step,) = re.findall(rf"{stage}: preempted \(SIGTERM\), checkpoint saved at step (\d+)", log)
  return int(step)


def _read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """The uninterrupted smoke job, and the same job preempted in the teacher stage, rerun with its
  latest teacher checkpoint damaged and preempted in the student stage, and rerun to the end."""
  session_dir = tmp_path_factory.getbasetemp()
  uninterrupted = tmp_path_factory.mktemp("uninterrupted")
  code, log = _main(uninterrupted, session_dir)
  assert code == 0, log[-3000:]
  workdir = tmp_path_factory.mktemp("preempted")
  runs = [_main(workdir, session_dir, stop_after=("teacher", 4))]
  teacher_step = _preempted_at(runs[0][1], "teacher")
  snapshot = {
    "teacher_step": teacher_step,
    "state": _restore_state(workdir, teacher_step),
    "eval.json": os.path.exists(workdir / "eval.json"),
  }
  _overwrite(workdir / "teacher" / str(teacher_step) / "config" / "metadata")
  runs.append(_main(workdir, session_dir, stop_after=("student", 2)))
  student_step = _preempted_at(runs[1][1], "student")
  snapshot |= {
    "student_step": student_step,
    "student_state": _restore_state(workdir, student_step, "student"),
    "results": _read_json(workdir / "eval.json"),
    "export": os.path.exists(workdir / "export"),
  }
  runs.append(_main(workdir, session_dir))
  return uninterrupted, workdir, runs, snapshot


def _assert_same_losses(workdir, uninterrupted, tag):
  """Every loss logged across the interrupted runs (re-run steps twice) is the uninterrupted one."""
  expected = dict(_scalars(str(uninterrupted), tag))
  logged = _scalars(str(workdir), tag)
  assert {step for step, _ in logged} == set(expected)
  for step, value in logged:
    assert value == expected[step], (tag, step)


def _assert_same_checkpoint(workdir, uninterrupted, step, stage):
  a = _restore_state(str(workdir), step, stage)
  b = _restore_state(str(uninterrupted), step, stage)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_sigterm_in_the_teacher_stage(smoke_runs):
  uninterrupted, workdir, runs, snapshot = smoke_runs
  code, log = runs[0]
  assert code == 0, log[-3000:]
  step = snapshot["teacher_step"]
  assert 4 < step < 20 and int(snapshot["state"]["step"]) == step
  assert "rerun the same command to resume from it" in log
  assert not snapshot["eval.json"]  # Nothing evaluated after the preempted stage.
  # The rerun found that checkpoint damaged, resumed from the one before and went on.
  code, log = runs[1]
  assert code == 0, log[-3000:]
  assert f"Checkpoint {workdir}/teacher/{step} is damaged" in log
  assert os.path.isdir(workdir / "teacher" / f"{step}.damaged")
  _assert_same_losses(workdir, uninterrupted, "teacher/loss")
  _assert_same_checkpoint(workdir, uninterrupted, 20, "teacher")


@pytest.mark.slow
def test_sigterm_in_the_student_stage(smoke_runs):
  uninterrupted, workdir, runs, snapshot = smoke_runs
  step = snapshot["student_step"]
  assert 2 < step < 10 and int(snapshot["student_state"]["step"]) == step
  assert set(snapshot["results"]) == {"teacher"} and not snapshot["export"]
  code, log = runs[2]
  assert code == 0, log[-3000:]
  assert f"Restored checkpoint {workdir}/student/{step}" in log
  _assert_same_losses(workdir, uninterrupted, "student/loss")
  _assert_same_checkpoint(workdir, uninterrupted, 10, "student")
  assert _read_json(workdir / "eval.json") == _read_json(uninterrupted / "eval.json")
