"""The job's workdir: checked before any work, and locked so that two jobs never share one.

`hold(workdir)` refuses a workdir that is an existing file, creates WORKDIR/.lock atomically
(`O_CREAT | O_EXCL`) holding this host and pid, and removes it at exit (with the workdir itself if
this job created it and left it empty). A second job on the same workdir stops with a
`BadWorkdirError` naming the first's host and pid. A lock left by a process that died on this host
(no such pid any more) is taken over with a warning. Correct on a local filesystem; on shared or
remote filesystems (NFS, gcsfuse, `gs://`) the check is best-effort: creation is not atomic there
and the pid of another host cannot be checked, so a lock left by a dead job on another host must be
deleted by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from binarydm_jax.errors import UserError
from binarydm_jax.runtime import fileio

LOCK_NAME = ".lock"


class BadWorkdirError(UserError):
  """The workdir cannot be used: not a directory, or another job holds its lock."""


# What a remote workdir that cannot be read usually needs (no credentials, no bucket, no network).
REMOTE_ACCESS_FIX = (
  "give this machine access: `gcloud auth application-default login`, or set "
  "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (on a Cloud TPU / GCE VM: a "
  "service account with Storage Object Admin on the bucket); check that the bucket exists and "
  "that the machine reaches storage.googleapis.com"
)


def check(workdir: str) -> None:
  """Raises `BadWorkdirError` if `workdir` exists but is not a directory, or is a remote path
  (`gs://...`) that cannot be read (the first access, so a missing login fails here in one line).
  """
  path = epath.Path(workdir)
  try:
    exists = path.exists()
  except Exception as e:  # noqa: BLE001 (the backends raise their own types: tf OpError, fsspec)
    if not fileio.is_remote(workdir):
      raise
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise BadWorkdirError(
      f"--workdir={workdir} cannot be read ({type(e).__name__}: {reason}); {REMOTE_ACCESS_FIX}"
    ) from None
  if exists and not path.is_dir():
    raise BadWorkdirError(
      f"--workdir={workdir} is an existing file, not a directory; pass a directory "
      "(it is created if missing), e.g. --workdir=workdirs/digits"
    )


def _owner_text() -> str:
  return json.dumps({"host": socket.gethostname(), "pid": os.getpid()})


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _create(lock: epath.Path, text: str) -> bool:
  """Writes `text` to `lock` unless it exists; True if this call created it."""
  if fileio.is_remote(lock):  # best-effort: no exclusive create on object stores
    if lock.exists():
      return False
    lock.write_text(text)
    return True
  try:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


def _read_owner(lock: epath.Path) -> dict | None:
  """The host and pid in `lock`, or None if it vanished or cannot be parsed."""
  try:
    owner = json.loads(lock.read_text())
  except (FileNotFoundError, ValueError):
    return None
  if not isinstance(owner, dict) or not {"host", "pid"} <= owner.keys():
    return None
  return owner


def _take_over_if_stale(lock: epath.Path, owner: dict, text: str) -> bool:
  """Replaces a lock of a dead pid on this host by ours; True if it did.

  A second lock file (`.lock.takeover`, created exclusively) makes concurrent take-overs safe: only
  its creator re-reads the lock and replaces it atomically (`os.replace`).
  """
  if owner["host"] != socket.gethostname() or _pid_alive(int(owner["pid"])):
    return False
  guard = lock.parent / (LOCK_NAME + ".takeover")
  if not _create(guard, text):
    return False
  try:
    if _read_owner(lock) != owner:  # changed since we read it: someone else was faster
      return False
    temp = lock.parent / f"{LOCK_NAME}.{os.getpid()}"
    temp.write_text(text)
    temp.replace(lock)
  finally:
    guard.unlink()
  logging.warning(
    "%s was left by pid %d on this host, which is no longer running; taking it over",
    lock,
    owner["pid"],
  )
  return True


def acquire(workdir: str) -> epath.Path:
  """Takes the lock of the existing directory `workdir`; returns the lock file's path.

  Raises:
    BadWorkdirError: if another job (a running pid, or a pid on another host) holds the lock.
  """
  path = epath.Path(workdir)
  lock = path / LOCK_NAME
  text = _owner_text()
  if _create(lock, text):
    return lock
  owner = _read_owner(lock)
  if owner is None:
    raise BadWorkdirError(
      f"{lock} exists but names no host and pid (written by hand?); if no other job uses "
      f"--workdir={workdir}, delete it and rerun"
    )
  if _take_over_if_stale(lock, owner, text):
    return lock
  raise BadWorkdirError(
    f"--workdir={workdir} is in use by another job (host {owner['host']}, pid {owner['pid']}); "
    f"wait for it to finish, pass another --workdir, or, if that job is no longer running, "
    f"delete {lock}"
  )


def release(lock: epath.Path) -> None:
  """Removes `lock` if it is still ours (a takeover by another job is left alone)."""
  if _read_owner(lock) == json.loads(_owner_text()):
    lock.unlink()


def _process_zero_agrees(ok: bool) -> bool:
  """Process 0's `ok` on every process (a collective with several processes)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Checks `workdir` and holds its lock while the block runs (see the module docstring).

  With several processes (`jax.distributed`) process 0 takes the lock and all of them stop if it
  cannot.

  Raises:
    BadWorkdirError: the workdir is a file, or another job holds its lock.
  """
  check(workdir)
  path = epath.Path(workdir)
  created = not path.exists()
  lock, error = None, None
  if jax.process_index() == 0:
    path.mkdir(parents=True, exist_ok=True)
    try:
      lock = acquire(workdir)
    except BadWorkdirError as e:
      error = e
  if not _process_zero_agrees(error is None):
    raise error or BadWorkdirError(f"process 0 could not lock --workdir={workdir} (see its log)")
  try:
    yield
  finally:
    if lock is not None:
      release(lock)
      if created and not any(path.iterdir()):
        path.rmdir()
