"""Device mesh and shardings: the batch is split over the `data` axis, params are replicated."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all) with Auto axis types (GSPMD propagation)."""
  devices = list(devices if devices is not None else jax.devices())
  size = len(devices) if mesh_config.data == -1 else mesh_config.data
  if size < 1 or size > len(devices):
    raise ValueError(
      f"config.mesh.data={mesh_config.data}: expected -1 or 1..{len(devices)} (devices available)"
    )
  return jax.make_mesh(
    (size,),
    (DATA_AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=devices[:size],
  )


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated over the mesh."""
  return NamedSharding(mesh, P())


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assembles this process's slice of the batch into one global array sharded over `data`."""
  sharding = data_sharding(mesh)
  global_shape = (local_batch.shape[0] * jax.process_count(),) + local_batch.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local_batch, global_shape)


def check_batch_divisible(batch_size: int, mesh: Mesh, key: str) -> None:
  """Raises a one-line error when the batch cannot be split evenly over the data axis."""
  n = mesh.shape[DATA_AXIS]
  if batch_size % n or batch_size % jax.process_count():
    raise ValueError(
      f"{key}={batch_size} must be divisible by the {n} devices of the data axis "
      f"and the {jax.process_count()} processes"
    )
