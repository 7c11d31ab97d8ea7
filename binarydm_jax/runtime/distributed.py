"""Multi-host start-up: `jax.distributed.initialize` from flags, or autodetected (Cloud TPU, SLURM)."""

from __future__ import annotations

import jax
from absl import logging

from binarydm_jax.errors import FlagError

MODES = ("off", "auto", "explicit")


def initialize(
  mode: str,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Connects this process to the others before any JAX computation.

  Args:
    mode: 'off' (single process), 'auto' (the cluster environment tells JAX everything, as on a
      Cloud TPU pod slice), or 'explicit' (coordinator address, process count and id given).
    coordinator_address: host:port of process 0 ('explicit' only).
    num_processes: total number of processes ('explicit' only).
    process_id: this process's index ('explicit' only).

  Raises:
    FlagError: an unknown mode, or 'explicit' without its three settings.
  """
  if mode not in MODES:
    raise FlagError(f"--distributed={mode!r}: expected one of {MODES}")
  if mode == "off":
    return
  if mode == "explicit" and None in (coordinator_address, num_processes, process_id):
    raise FlagError(
      "--distributed=explicit needs --coordinator_address, --num_processes and --process_id"
    )
  # CPU devices of different processes talk through gloo (TPU/GPU use their own interconnect).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if mode == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info("Process %d of %d connected", jax.process_index(), jax.process_count())
