"""Helpers the benchmark scripts share (defines no flags, so any script can import it)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Any

import jax
import numpy as np

from binarydm_jax.models.unet import UNet


def random_teacher(model: UNet, x: jax.Array, t: jax.Array, seed: int = 0) -> dict[str, Any]:
  """FP params with every leaf random (no zero-initialised kernels), made without compiling."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  rng = np.random.default_rng(seed)

  def make(path: tuple[Any, ...], shape: jax.ShapeDtypeStruct) -> np.ndarray:
    if path[-1].key == "kernel":
      fan_in = int(np.prod(shape.shape[:-1]))
      return rng.normal(0, 1 / np.sqrt(fan_in), shape.shape).astype(np.float32)
    base = 1.0 if path[-1].key == "scale" else 0.0
    return (base + 0.1 * rng.normal(size=shape.shape)).astype(np.float32)

  return jax.tree.map_with_path(make, shapes)


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def write_json(path: str | None, result: dict[str, Any]) -> None:
  """Writes a benchmark's `result` to `path` (its --json flag), if given."""
  if path:
    with open(path, "w") as f:
      json.dump(result, f, indent=2)


def code_version() -> str | None:
  """The repository's commit (short hash, '+dirty' with uncommitted changes), or None outside git.

  1-bit runs are chaotic under float-level changes, so a per-seed FID belongs to one code version.
  """
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--", "binarydm_jax", "configs", "benchmarks/*.py"],
      cwd=here,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ("+dirty" if dirty else "")
