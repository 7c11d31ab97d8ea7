"""`Job`: what every stage of a run shares (config, workdir, mesh, data, UNet, schedule, writer)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import ml_collections
from clu import metric_writers
from jax.sharding import Mesh

from binarydm_jax import diffusion
from binarydm_jax.input_pipeline import ImageDataset
from binarydm_jax.sampling import Sampler

# `make(stage name, sampler) -> on_sample(state, step)`: what a training stage does with samples.
SampleCallbacks = Callable[[str, Sampler], Callable[[Any, int], None]]


@dataclasses.dataclass(frozen=True)
class Job:
  """One run's settings and the objects its stages share, built once by `pipeline.setup_job`.

  `model` is the full-precision UNet of `config.model` (the teacher's architecture; the student
  binarizes it); `on_sample` makes each training stage's sampling callback (the job saves grids,
  the ablation scores FIDs).
  """

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  dataset: ImageDataset
  model: nn.Module
  schedule: diffusion.Schedule
  writer: metric_writers.MetricWriter
  on_sample: SampleCallbacks

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the training images, which is what every model here samples."""
    return tuple(self.dataset.train.shape[1:])
