"""Orbax checkpoints of a training stage: periodic, keep-last-N, atomic, resumable.

Each stage (e.g. WORKDIR/teacher) holds one CheckpointManager; a checkpoint stores the TrainState
and the config as JSON, so a restart can verify it is resuming the same model. A checkpoint that
cannot be read is renamed aside (`<step>.damaged`) and the restart resumes from an older one.
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

from binarydm_jax.errors import UserError
from binarydm_jax.runtime import fileio


class CheckpointMismatchError(UserError, ValueError):
  """The checkpoint in a directory was written for a different model than the current config."""


class CheckpointDamagedError(UserError, ValueError):
  """A stage directory holds checkpoints, but none of them can be read."""


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
  checkpoint was written, e.g. the model architecture. Newer checkpoints that orbax cannot read (a
  truncated or overwritten file) are renamed aside to `<step>.damaged`, with a warning, once an
  older one has been read; when none can be read nothing is renamed (another version of the code
  cannot read any of them either).

  Raises:
    CheckpointMismatchError: the checkpoint was written under different structural settings.
    CheckpointDamagedError: checkpoints exist but none of them can be read.
  """
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  unreadable: dict[int, Exception] = {}
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
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
      restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
      )
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


def _describe(error: Exception) -> str:
  """`Type: first line of the message` (orbax's tensorstore errors run over many lines)."""
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


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
