"""Orbax checkpoints of a training stage: periodic, keep-last-N, atomic, resumable.

Each stage (e.g. WORKDIR/teacher) holds one CheckpointManager; a checkpoint stores the TrainState
and the config as JSON, so a restart can verify it is resuming the same model.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy


class CheckpointMismatchError(ValueError):
  """The checkpoint in a directory was written for a different model than the current config."""


class CheckpointDamagedError(ValueError):
  """A stage directory holds checkpoints, but none of them can be read."""


def make_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """A manager that keeps the `keep` most recent checkpoints of `directory`."""
  options = ocp.CheckpointManagerOptions(
    create=True, preservation_policy=preservation_policy.LatestN(keep)
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


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
  checkpoint was written, e.g. the model architecture. A checkpoint orbax cannot read (a truncated
  or overwritten file) is renamed aside to `<step>.damaged` with a warning, and the next older one
  is tried.

  Raises:
    CheckpointMismatchError: the checkpoint was written under different structural settings.
    CheckpointDamagedError: checkpoints exist but none of them can be read.
  """
  damaged = []
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  for step in sorted(manager.all_steps(), reverse=True):
    saved = _read_or_move_aside(manager, step, config=ocp.args.JsonRestore())
    if saved is not None:
      diffs = _structural_diff(saved["config"], config, structural_keys)
      if diffs:
        raise CheckpointMismatchError(
          f"checkpoint {manager.directory}/{step} belongs to a different model "
          f"({'; '.join(diffs)}); use a fresh --workdir or the checkpoint's settings"
        )
      saved = _read_or_move_aside(manager, step, state=ocp.args.StandardRestore(target))
    if saved is None:
      damaged.append(step)
      continue
    logging.info("Restored checkpoint %s/%d", manager.directory, step)
    return saved["state"]
  if damaged:
    raise CheckpointDamagedError(
      f"no readable checkpoint in {manager.directory} (steps {damaged} were moved aside to "
      "<step>.damaged); rerun to train this stage from scratch, or rename a repaired copy back "
      "to its step number"
    )
  return None


def _read_or_move_aside(
  manager: ocp.CheckpointManager, step: int, **items: ocp.args.CheckpointArgs
) -> Any | None:
  """Restores `items` of `step`; if orbax cannot, renames the step to `<step>.damaged[-N]` (which
  orbax does not list) and returns None."""
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as error:  # orbax raises anything from JSON decoding to tensorstore errors.
    _move_aside(manager, step, error)
    return None


def _move_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
  path = epath.Path(manager.directory) / str(step)
  aside = path.with_name(f"{step}.damaged")
  n = 1
  while aside.exists():
    n += 1
    aside = path.with_name(f"{step}.damaged-{n}")
  first_line = (str(error).splitlines() or [""])[0][:200]
  logging.warning(
    "Checkpoint %s is damaged (%s: %s); moved aside to %s, trying an older one",
    path,
    type(error).__name__,
    first_line,
    aside.name,
  )
  if jax.process_index() == 0:
    path.rename(aside)
  if jax.process_count() > 1:  # The others see the rename before listing the steps again.
    multihost_utils.sync_global_devices(f"checkpoint_moved_aside_{step}")
  manager.reload()
