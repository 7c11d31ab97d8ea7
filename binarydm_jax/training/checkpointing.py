"""Orbax checkpoints of a training stage: periodic, keep-last-N, atomic, resumable.

Each stage (e.g. WORKDIR/teacher) holds one CheckpointManager; a checkpoint stores the TrainState
and the config as JSON, so a restart can verify it is resuming the same model. A checkpoint whose
files do not decode is renamed aside (`<step>.damaged`) and the restart resumes from an older one;
a read that fails for an I/O, permission or network reason is retried and, if it keeps failing,
stops the job with nothing renamed (`is_transient`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

from binarydm_jax.errors import UserError
from binarydm_jax.runtime import fileio


class CheckpointMismatchError(UserError, ValueError):
  """The checkpoint in a directory was written for a different model than the current config."""


class CheckpointDamagedError(UserError, ValueError):
  """A stage directory holds checkpoints, but none of them can be read."""


class CheckpointAccessError(UserError, OSError):
  """Reading a checkpoint kept failing for an I/O, permission or network reason; nothing renamed."""


@dataclasses.dataclass(frozen=True)
class ReadRetry:
  """How often a checkpoint read that failed for a transient reason is tried, and how long apart."""

  attempts: int = 5  # Tries in all; the waits between them are 2, 4, 8, 16 s (30 s in all).
  first_delay_s: float = 2.0
  backoff: float = 2.0
  sleep: Callable[[float], None] = time.sleep  # Tests pass a recorder.

  def delays(self) -> Iterator[float]:
    """The waits before the 2nd, 3rd, ... try."""
    delay = self.first_delay_s
    for _ in range(self.attempts - 1):
      yield delay
      delay *= self.backoff


READ_RETRY = ReadRetry()

# absl status codes that tensorstore (orbax's array reads, its own GCS client included) puts at the
# start of a ValueError's message for a failure of the storage, not of the data.
_TRANSIENT_STATUS = re.compile(
  r"^(UNAVAILABLE|DEADLINE_EXCEEDED|PERMISSION_DENIED|UNAUTHENTICATED|RESOURCE_EXHAUSTED|ABORTED"
  r"|CANCELLED):"
)
# Exception class names (anywhere in the MRO) of storage clients that are not imported here:
# google.api_core (gcsfs, google-cloud-storage), google.auth, TensorFlow's gfile, aiohttp, urllib3.
_TRANSIENT_TYPES = frozenset(
  {
    "ServiceUnavailable",
    "TooManyRequests",
    "InternalServerError",
    "BadGateway",
    "GatewayTimeout",
    "DeadlineExceeded",
    "Forbidden",
    "Unauthorized",
    "PermissionDenied",
    "Unauthenticated",
    "RetryError",
    "TransportError",
    "RefreshError",
    "UnavailableError",
    "DeadlineExceededError",
    "PermissionDeniedError",
    "UnauthenticatedError",
    "ResourceExhaustedError",
    "AbortedError",
    "ClientConnectionError",
    "ClientPayloadError",
    "ServerTimeoutError",
    "ProtocolError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
  }
)
# HTTP statuses (an int `code`, `status` or `status_code`, as gcsfs's HttpError and google.api_core
# carry) of a request that failed, not of a file that is missing or wrong.
_TRANSIENT_HTTP = frozenset({401, 403, 408, 429, 500, 502, 503, 504})
# OSErrors that say the files are not there: part of a committed checkpoint is missing (damage).
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def make_manager(directory: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
  """A manager that keeps the `keep` most recent checkpoints of `directory`."""
  options = ocp.CheckpointManagerOptions(
    create=True, preservation_policy=preservation_policy.LatestN(keep)
  )
  return ocp.CheckpointManager(fileio.absolute(directory), options=options)


def save(
  manager: ocp.CheckpointManager, step: int, state: Any, config: ml_collections.ConfigDict
) -> None:
  """Saves `state` and `config` at `step` (asynchronously; orbax commits atomically)."""
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())
    ),
    force=True,
  )


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _structural_diff(
  saved: dict, config: ml_collections.ConfigDict, structural_keys: tuple[str, ...]
) -> list[str]:
  """The saved-vs-current differences under `structural_keys` (sections or `section.key`)."""
  old, new = _flatten(saved), _flatten(config.to_dict())
  diffs = []
  for key in sorted(set(old) | set(new)):
    if not any(key == k or key.startswith(k + ".") for k in structural_keys):
      continue
    if _normalise(old.get(key)) != _normalise(new.get(key)):
      diffs.append(f"{key}: checkpoint {old.get(key)!r} vs config {new.get(key)!r}")
  return diffs


def _normalise(value: Any) -> Any:
  """JSON turns tuples into lists; compare them as equal."""
  return list(value) if isinstance(value, tuple | list) else value


def restore_latest(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  config: ml_collections.ConfigDict,
  structural_keys: tuple[str, ...],
) -> Any | None:
  """Restores the newest readable checkpoint into the shardings of `abstract_state`, or None.

  `structural_keys` are the config sections (or `section.key`s) that must be unchanged since the
  checkpoint was written, e.g. the model architecture. Newer checkpoints whose files do not decode
  (a truncated, overwritten or missing file) are renamed aside to `<step>.damaged`, with a warning,
  once an older one has been read; when none can be read nothing is renamed (another version of the
  code cannot read any of them either). A read that fails for an I/O, permission or network reason
  (`is_transient`) is retried as `READ_RETRY` says; if it keeps failing the job stops, nothing
  renamed.

  Raises:
    CheckpointMismatchError: the checkpoint was written under different structural settings.
    CheckpointDamagedError: checkpoints exist but none of them can be read.
    CheckpointAccessError: a read kept failing for a transient reason.
  """
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  unreadable: dict[int, Exception] = {}
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      saved_config = _read(manager, step, ocp.args.Composite(config=ocp.args.JsonRestore()))
    except CheckpointAccessError:
      raise
    except Exception as error:  # orbax raises anything from JSON decoding to tensorstore errors.
      unreadable[step] = error
      continue
    diffs = _structural_diff(saved_config["config"], config, structural_keys)
    if diffs:
      raise CheckpointMismatchError(
        f"checkpoint {manager.directory}/{step} belongs to a different model "
        f"({'; '.join(diffs)}); use a fresh --workdir or the checkpoint's settings"
      )
    try:
      restored = _read(manager, step, ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except CheckpointAccessError:
      raise
    except Exception as error:
      unreadable[step] = error
      continue
    for damaged, error in unreadable.items():
      _move_aside(manager, damaged, error)
    logging.info("Restored checkpoint %s/%d", manager.directory, step)
    return restored["state"]
  if unreadable:
    newest = max(unreadable)
    raise CheckpointDamagedError(
      f"no checkpoint in {manager.directory} can be read (steps {sorted(unreadable)}; step "
      f"{newest}: {_describe(unreadable[newest])}); if another version of binarydm_jax wrote "
      f"them, run that version, otherwise move {manager.directory} away to train this stage "
      "from scratch"
    )
  return None


def _read(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> Any:
  """`manager.restore(step, args)`, tried again after a transient failure.

  Raises:
    CheckpointAccessError: the failure was transient every time.
    Exception: whatever orbax raised for files that do not decode (damage); MemoryError as is.
  """
  retry = READ_RETRY
  delays = retry.delays()
  tries = 0
  while True:
    tries += 1
    try:
      return manager.restore(step, args=args)
    except MemoryError:
      raise  # Not the checkpoint's fault, and a retry runs out of memory again.
    except Exception as error:
      cause = _transient_link(error)
      if cause is None:
        raise
      delay = next(delays, None)
      path = f"{manager.directory}/{step}"
      if delay is None:
        raise CheckpointAccessError(
          f"cannot read checkpoint {path}: {_describe(cause)} (still failing after {tries} "
          f"tries); nothing was renamed or deleted: check access to {manager.directory} "
          "(network, permissions, credentials), then rerun the same command to resume from it"
        ) from error
      logging.warning(
        "Reading checkpoint %s failed (%s); trying again in %.3g s", path, _describe(cause), delay
      )
      retry.sleep(delay)


def is_transient(error: BaseException) -> bool:
  """Whether `error` (or an exception it was raised from or while handling) is a failure of the
  storage (I/O, permission, network) rather than of the checkpoint's files.

  Transient: an OSError other than a missing file (TimeoutError, ConnectionError, PermissionError,
  EIO, ...); a tensorstore status such as `UNAVAILABLE:` or `DEADLINE_EXCEEDED:`; a cloud client's
  error recognised by its class name or an HTTP status such as 429 or 503. Anything else (a JSON,
  UTF-8 or tensorstore decode error, a missing file, a tree that does not match) is damage.
  """
  return _transient_link(error) is not None


def _transient_link(error: BaseException) -> BaseException | None:
  """The first exception of `error`'s chain that `is_transient` recognises, or None."""
  for link in _chain(error):
    if isinstance(link, OSError) and not isinstance(link, _MISSING):
      return link
    if _TRANSIENT_STATUS.match(_message(link)):
      return link
    if any(cls.__name__ in _TRANSIENT_TYPES for cls in type(link).__mro__):
      return link
    if any(status in _TRANSIENT_HTTP for status in _http_statuses(link)):
      return link
  return None


def _message(error: BaseException) -> str:
  try:
    return str(error)
  except Exception:  # A foreign exception class whose __str__ fails.
    return ""


def _http_statuses(error: BaseException) -> Iterator[int]:
  """The ints in `error`'s `code`, `status` and `status_code` attributes (HTTP clients' names)."""
  for attribute in ("code", "status", "status_code"):
    try:
      value = getattr(error, attribute, None)
    except Exception:  # A property of a foreign exception class; it says nothing then.
      continue
    if isinstance(value, int) and not isinstance(value, bool):
      yield value


def _chain(error: BaseException) -> Iterator[BaseException]:
  """`error` and the exceptions it was raised from or while handling, each once."""
  seen: set[int] = set()
  todo = [error]
  while todo:
    link = todo.pop()
    if link is None or id(link) in seen:
      continue
    seen.add(id(link))
    yield link
    todo += [link.__context__, link.__cause__]


def _describe(error: BaseException) -> str:
  """`Type: first line of the message` (orbax's tensorstore errors run over many lines)."""
  return f"{type(error).__name__}: {(_message(error).splitlines() or [''])[0][:200]}"


def _move_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
  """Renames the checkpoint of `step` to `<step>.damaged[-N]`, which orbax does not list."""
  path = epath.Path(manager.directory) / str(step)
  aside = path.with_name(f"{step}.damaged")
  n = 1
  while aside.exists():
    n += 1
    aside = path.with_name(f"{step}.damaged-{n}")
  logging.warning(
    "Checkpoint %s is damaged (%s); moved aside to %s, resuming from an older one",
    path,
    _describe(error),
    aside.name,
  )
  if jax.process_index() == 0:
    path.rename(aside)
  if jax.process_count() > 1:  # The others see the rename before listing the steps again.
    multihost_utils.sync_global_devices(f"checkpoint_moved_aside_{step}")
  manager.reload()
