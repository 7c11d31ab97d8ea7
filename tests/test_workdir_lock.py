"""Bad --config/--workdir as one error line, and the workdir lock (binarydm_jax/training/workdir_lock.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest
from absl import logging

from binarydm_jax.training import workdir_lock
from tests.test_cli import run_main


@pytest.fixture
def session_dir(tmp_path_factory):
  """Where the subprocesses keep their XLA cache (outside the workdirs under test)."""
  return tmp_path_factory.getbasetemp()


def _only_error_line(result):
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, result.stderr
  return lines[0]


def _write_lock(workdir, host, pid):
  (workdir / ".lock").write_text(json.dumps({"host": host, "pid": pid}))


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_missing_config_file_is_one_line(tmp_path, session_dir):
  workdir = tmp_path / "work"
  result = run_main(
    ["--config=configs/no_such_config.py", f"--workdir={workdir}"], session_dir, timeout=60
  )
  line = _only_error_line(result)
  assert line.startswith("error: --config: config file 'configs/no_such_config.py' not found")
  assert "--config=configs/digits.py" in line
  assert not workdir.exists()


def test_workdir_that_is_a_file_is_one_line(tmp_path, session_dir):
  workdir = tmp_path / "notes.txt"
  workdir.write_text("keep me")
  result = run_main(["--config=configs/digits.py:smoke", f"--workdir={workdir}"], session_dir)
  line = _only_error_line(result)
  assert line.startswith(f"error: --workdir={workdir} is an existing file, not a directory")
  assert workdir.read_text() == "keep me"


def test_second_job_on_a_workdir_refuses_naming_the_first(tmp_path, session_dir):
  """The lock of a running process (this test's) stops the job before any work."""
  host = socket.gethostname()
  _write_lock(tmp_path, host, os.getpid())
  result = run_main(["--config=configs/digits.py:smoke", f"--workdir={tmp_path}"], session_dir)
  line = _only_error_line(result)
  assert f"is in use by another job (host {host}, pid {os.getpid()})" in line
  assert str(tmp_path / ".lock") in line
  assert os.listdir(tmp_path) == [".lock"]  # nothing written, the first job's lock kept
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_hold_writes_host_and_pid_and_removes_the_lock_at_exit(tmp_path):
  lock = tmp_path / ".lock"
  with workdir_lock.hold(str(tmp_path)):
    assert json.loads(lock.read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    (tmp_path / "teacher").mkdir()
  assert not lock.exists() and (tmp_path / "teacher").is_dir()


def test_hold_removes_the_lock_when_the_job_fails(tmp_path):
  with pytest.raises(RuntimeError), workdir_lock.hold(str(tmp_path)):
    raise RuntimeError("stage failed")
  assert os.listdir(tmp_path) == []


def test_a_workdir_it_created_and_left_empty_is_removed(tmp_path):
  workdir = tmp_path / "a" / "b"
  with workdir_lock.hold(str(workdir)):
    assert (workdir / ".lock").exists()
  assert not workdir.exists()


def test_nested_hold_refuses(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with pytest.raises(workdir_lock.BadWorkdirError, match=f"pid {os.getpid()}"):
      with workdir_lock.hold(str(tmp_path)):
        pass
    assert (tmp_path / ".lock").exists()  # the refused job left the first one's lock alone
  assert not (tmp_path / ".lock").exists()


def test_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path, monkeypatch):
  dead = _dead_pid()
  _write_lock(tmp_path, socket.gethostname(), dead)
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  with workdir_lock.hold(str(tmp_path)):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  (warning,) = warnings
  assert f"left by pid {dead} on this host" in warning and "taking it over" in warning
  assert os.listdir(tmp_path) == []  # the take-over guard is gone too


def test_lock_of_another_host_is_not_taken_over(tmp_path):
  _write_lock(tmp_path, "tpu-worker-7", _dead_pid())
  with pytest.raises(workdir_lock.BadWorkdirError, match="host tpu-worker-7"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  assert json.loads((tmp_path / ".lock").read_text())["host"] == "tpu-worker-7"


def test_unreadable_lock_is_refused_with_the_fix(tmp_path):
  (tmp_path / ".lock").write_text("hello")
  with pytest.raises(workdir_lock.BadWorkdirError, match="names no host and pid.*delete it"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  assert (tmp_path / ".lock").read_text() == "hello"


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    _write_lock(tmp_path, "elsewhere", 1)  # e.g. taken over by another job meanwhile
  assert json.loads((tmp_path / ".lock").read_text())["host"] == "elsewhere"
