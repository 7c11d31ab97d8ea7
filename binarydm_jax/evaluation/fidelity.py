"""A student measured against its teacher, image by image: a paired measure with little noise.

Both models start from the same N noises and follow the same deterministic DDIM path, so each
student image has a teacher image it should equal. The measure reports the mean squared error and
PSNR of the final images against the teacher's (values in [-1, 1], peak-to-peak 2), the fraction of
images whose digit the digits classifier reads the same (`label_agreement`, 1-channel 16 px
images), the student's mean brightness bias and its share of background pixels (<= -0.95) beside
the teacher's, and the per-image errors (for paired comparisons of two students).

For a quantized model, `sqnr_table` measures each quantized input's signal-to-quantization-noise
ratio 10 log10(sum x^2 / sum (x - q(x))^2) in timestep groups, on real images noised at each
group's timesteps: where in the network and when along the trajectory the quantizers lose the most.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from binarydm_jax import diffusion
from binarydm_jax.evaluation.digits_classifier import DigitsFeatureExtractor
from binarydm_jax.quant.activations import ERROR_COLLECTION
from binarydm_jax.sampling import samplers

BACKGROUND = -0.95  # Pixels at or below this value count as background (digits are light on dark).
PEAK_TO_PEAK = 2.0  # Images are in [-1, 1].
DIGITS_SIZE = 16


def psnr(mse: float) -> float:
  """Peak signal-to-noise ratio in dB of a mean squared error on images in [-1, 1]."""
  return float(10.0 * math.log10(PEAK_TO_PEAK**2 / max(mse, 1e-12)))


def image_fidelity(
  teacher: np.ndarray, student: np.ndarray, classifier: DigitsFeatureExtractor | None = None
) -> dict[str, Any]:
  """The paired measure of `student` images against the `teacher` images from the same noises.

  Args:
    teacher: (N, H, W, C) in [-1, 1].
    student: the same shape, sample i drawn from the same noise as teacher[i].
    classifier: the digits classifier, for `label_agreement` (None: not reported).

  Returns:
    {'num', 'mse', 'psnr', 'psnr_per_image' (mean of per-image PSNRs), 'label_agreement',
    'mean_bias' (mean of student - teacher), 'background' {'teacher', 'student'} (fraction of
    pixels <= -0.95), 'per_image_mse' (list)}.
  """
  teacher = np.asarray(teacher, np.float64)
  student = np.asarray(student, np.float64)
  if teacher.shape != student.shape:
    raise ValueError(f"teacher images {teacher.shape} and student images {student.shape} differ")
  per_image = np.mean((student - teacher) ** 2, axis=(1, 2, 3))
  agreement = None
  if classifier is not None:
    agreement = float(np.mean(classifier.predict(teacher) == classifier.predict(student)))
  return {
    "num": len(teacher),
    "mse": float(np.mean(per_image)),
    "psnr": psnr(float(np.mean(per_image))),
    "psnr_per_image": float(np.mean([psnr(m) for m in per_image])),
    "label_agreement": agreement,
    "mean_bias": float(np.mean(student - teacher)),
    "background": {
      "teacher": float(np.mean(teacher <= BACKGROUND)),
      "student": float(np.mean(student <= BACKGROUND)),
    },
    "per_image_mse": [float(m) for m in per_image],
  }


def digits_classifier(image_shape: Sequence[int]) -> DigitsFeatureExtractor | None:
  """The digits classifier for 1-channel 16 px images (the digits jobs), else None."""
  if tuple(image_shape) != (DIGITS_SIZE, DIGITS_SIZE, 1):
    return None
  return DigitsFeatureExtractor(DIGITS_SIZE)


def pairs_grid(
  teacher: np.ndarray, student: np.ndarray, count: int = 32, columns: int = 8
) -> np.ndarray:
  """A uint8 grid of `count` pairs, enlarged to >= 64 px: rows of teacher images, each followed
  by the row of the student's images from the same noises."""
  count = min(count, len(teacher))
  rows = []
  for start in range(0, count, columns):
    stop = min(start + columns, count)
    pad = columns - (stop - start)
    for images in (teacher[start:stop], student[start:stop]):
      rows.append(np.concatenate([images, np.full((pad, *images.shape[1:]), 1.0)]))
  return samplers.image_grid(np.concatenate(rows), columns=columns)


def timestep_group_batch(
  images: np.ndarray, schedule: diffusion.Schedule, groups: int, seed: int = 0
) -> tuple[jax.Array, jax.Array]:
  """Every image noised once in each of `groups` equal timestep ranges: (x_t, t), groups * N rows.

  Row g * N + i holds image i at a timestep drawn uniformly from group g's range.
  """
  rng = np.random.default_rng(seed)
  n, T = len(images), schedule.num_timesteps
  edges = np.linspace(0, T, groups + 1).astype(int)
  t = np.concatenate([rng.integers(edges[g], edges[g + 1], n) for g in range(groups)])
  x0 = np.concatenate([images] * groups).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  return diffusion.q_sample(schedule, jnp.asarray(x0), jnp.asarray(t), noise), jnp.asarray(t)


def layer_kind(path: str) -> str:
  """The kind of a layer, for grouping: its name without an index ('conv_1', 'q', 'skip', ...)."""
  name = path.split("/")[-1]
  return name if re.fullmatch(r"conv_\d", name) else re.sub(r"_\d+$", "", name)


def sqnr_table(
  model: nn.Module,
  params: Any,
  x_t: jax.Array,
  t: jax.Array,
  groups: int,
  num_timesteps: int,
  batch_size: int = 256,
) -> dict[str, Any]:
  """Each quantized input's SQNR (dB) in `groups` equal timestep ranges.

  Args:
    model: the quantized UNet.
    params: its inner params.
    x_t, t: noised inputs and their timesteps (e.g. `timestep_group_batch`).
    groups: number of timestep ranges.
    num_timesteps: T.
    batch_size: rows per forward pass.

  Returns:
    {'groups': [[lo, hi) per group], 'layers': {path: [dB per group]}, 'by_kind': {kind: [mean dB
    over its layers, per group]}, 'mean': mean over layers and groups}; empty tables for a model
    without quantized inputs.
  """

  @jax.jit
  def errors(x, t):
    _, state = model.apply({"params": params}, x, t, mutable=[ERROR_COLLECTION])
    return state.get(ERROR_COLLECTION, {})

  sums: dict[str, dict[str, list[np.ndarray]]] = collections.defaultdict(
    lambda: {"signal": [], "noise": []}
  )
  for start in range(0, len(t), batch_size):
    state = errors(x_t[start : start + batch_size], t[start : start + batch_size])
    for (*path, name), (value,) in traverse_util.flatten_dict(state).items():
      sums["/".join(path)][name].append(np.asarray(value, np.float64))
  group_of = np.minimum(np.asarray(t) * groups // num_timesteps, groups - 1)
  layers = {}
  for path, parts in sums.items():
    signal, noise = np.concatenate(parts["signal"]), np.concatenate(parts["noise"])
    layers[path] = [
      float(10 * np.log10(signal[group_of == g].sum() / max(noise[group_of == g].sum(), 1e-30)))
      for g in range(groups)
    ]
  by_kind: dict[str, list[list[float]]] = collections.defaultdict(list)
  for path, values in layers.items():
    by_kind[layer_kind(path)].append(values)
  edges = np.linspace(0, num_timesteps, groups + 1).astype(int)
  return {
    "groups": [[int(edges[g]), int(edges[g + 1])] for g in range(groups)],
    "layers": layers,
    "by_kind": {kind: np.mean(rows, axis=0).tolist() for kind, rows in sorted(by_kind.items())},
    "mean": float(np.mean(list(layers.values()))) if layers else None,
  }


def format_sqnr(table: Mapping[str, Any]) -> str:
  """A markdown table of `sqnr_table`'s `by_kind`: a row per layer kind, a column per group."""
  header = " | ".join(f"t {lo}-{hi - 1}" for lo, hi in table["groups"])
  lines = [f"| layer kind | {header} |", "|---|" + "---|" * len(table["groups"])]
  for kind, values in table["by_kind"].items():
    lines.append(f"| {kind} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
  return "\n".join(lines)
