"""Device mesh and shardings.

The mesh has a `data` and an `fsdp` axis (both Auto). The batch is split over all devices (both
axes); params and optimizer state are replicated, or, when `mesh.fsdp > 1`, their large leaves are
split over `fsdp` along their largest divisible dimension (ZeRO-3 style; XLA inserts the gathers).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from binarydm_jax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Leaves smaller than this stay replicated under fsdp: splitting them saves nothing.
MIN_FSDP_SIZE = 2**12


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all); `data=-1` takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  fsdp = mesh_config.get("fsdp", 1)
  if not isinstance(fsdp, int) or fsdp < 1 or len(devices) % fsdp:
    raise ConfigError(
      f"config.mesh.fsdp={fsdp!r}: expected a positive divisor of the {len(devices)} devices"
    )
  data = len(devices) // fsdp if mesh_config.data == -1 else mesh_config.data
  if not isinstance(data, int) or data < 1 or data * fsdp > len(devices):
    raise ConfigError(
      f"config.mesh.data={mesh_config.data!r}: expected -1 or 1..{len(devices) // fsdp} "
      f"({len(devices)} devices, mesh.fsdp={fsdp})"
    )
  return jax.make_mesh(
    (data, fsdp),
    (DATA_AXIS, FSDP_AXIS),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
    devices=devices[: data * fsdp],
  )


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated over the mesh."""
  return NamedSharding(mesh, P())


def leaf_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """fsdp rule for one array: split its largest dimension divisible by the fsdp size, if large."""
  n = mesh.shape[FSDP_AXIS]
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
    return replicated(mesh)
  candidates = [d for d in range(len(shape)) if shape[d] % n == 0]
  if not candidates:
    return replicated(mesh)
  dim = max(candidates, key=lambda d: (shape[d], d))
  spec = [None] * len(shape)
  spec[dim] = FSDP_AXIS
  return NamedSharding(mesh, P(*spec))


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """Shardings for every leaf of a (possibly abstract) pytree by the fsdp rule."""
  return jax.tree.map(lambda x: leaf_sharding(tuple(x.shape), mesh), abstract_tree)


def global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assembles this process's slice of the batch into one global array split over the mesh."""
  global_shape = (local_batch.shape[0] * jax.process_count(),) + local_batch.shape[1:]
  return jax.make_array_from_process_local_data(data_sharding(mesh), local_batch, global_shape)


def check_batch_divisible(batch_size: int, mesh: Mesh, key: str) -> None:
  """Raises a one-line error when the batch cannot be split evenly over devices and processes."""
  n = mesh.devices.size
  if batch_size % n or batch_size % jax.process_count():
    raise ConfigError(
      f"{key}={batch_size} must be divisible by the {n} devices of the mesh "
      f"and the {jax.process_count()} processes"
    )
