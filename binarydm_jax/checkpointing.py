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
from orbax.checkpoint.checkpoint_managers import preservation_policy


class CheckpointMismatchError(ValueError):
  """The checkpoint in a directory was written for a different model than the current config."""


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
  """Restores the latest checkpoint into the shardings of `abstract_state`, or returns None.

  `structural_keys` are the config sections (or `section.key`s) that must be unchanged since the
  checkpoint was written, e.g. the model architecture.

  Raises:
    CheckpointMismatchError: the checkpoint was written under different structural settings.
  """
  step = manager.latest_step()
  if step is None:
    return None
  saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
    "config"
  ]
  diffs = _structural_diff(saved_config, config, structural_keys)
  if diffs:
    raise CheckpointMismatchError(
      f"checkpoint {manager.directory}/{step} belongs to a different model ({'; '.join(diffs)}); "
      "use a fresh --workdir or the checkpoint's settings"
    )
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  logging.info("Restored checkpoint %s/%d", manager.directory, step)
  return restored["state"]
