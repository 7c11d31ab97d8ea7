"""`Job`: what every stage of a run shares (config, workdir, mesh, data, UNet, schedule, writer)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import ml_collections
from jax.sharding import Mesh

from binarydm_jax import diffusion
from binarydm_jax.data.first_stage import FirstStage
from binarydm_jax.data.input_pipeline import ImageDataset
from binarydm_jax.evaluation import evaluator
from binarydm_jax.runtime import sharding
from binarydm_jax.sampling import samplers
from binarydm_jax.sampling.samplers import Sampler

if TYPE_CHECKING:
  from clu import metric_writers

# `make(stage name, sampler) -> on_sample(state, step)`: what a training stage does with samples.
SampleCallbacks = Callable[[str, Sampler], Callable[[Any, int], None]]


@dataclasses.dataclass(frozen=True)
class Job:
  """One run's settings and the objects its stages share, built once by `pipeline.setup_job`.

  `model` is the full-precision UNet of `config.model` (the teacher's architecture; the student
  binarizes it); `on_sample` makes each training stage's sampling callback (the job saves grids,
  the ablation scores FIDs). `dataset` is what the UNet trains on: the images, or for latent
  diffusion their latents under `first_stage`, in which case `images` holds the images the
  evaluation compares samples with (else it is `dataset` itself).
  """

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  dataset: ImageDataset
  model: nn.Module
  schedule: diffusion.Schedule
  writer: metric_writers.MetricWriter
  on_sample: SampleCallbacks
  first_stage: FirstStage | None = None
  images: ImageDataset | None = None

  def __post_init__(self):
    if self.images is None:
      object.__setattr__(self, "images", self.dataset)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of what the UNet denoises: the training images, or their latents."""
    return tuple(self.dataset.train.shape[1:])

  def sampler(self, model: nn.Module) -> Sampler:
    """`samplers.make_sampler` for a UNet of this job: its images, decoded if latent."""
    decode = self.first_stage.decode if self.first_stage else None
    return samplers.make_sampler(
      model, self.schedule, self.config.sampling, self.mesh, self.image_shape, decode
    )

  def evaluate(
    self, name: str, params: Any, model: nn.Module, model_id: str = ""
  ) -> dict[str, Any]:
    """Scores `model` with `params` by `config.eval.metric`; see `evaluator.evaluate_sampler`.

    `model_id` tells these params apart from others evaluated under the same `name` in the job's
    workdir (e.g. the stage's final step): metric 'inception' resumes only shards drawn with the
    same name, id and sampling settings.
    """
    batch = self.config.eval.batch_size
    sharding.check_batch_divisible(batch, self.mesh, "config.eval.batch_size")
    return evaluator.evaluate_sampler(
      name,
      self.sampler(model),
      params,
      self.config,
      self.images,
      self.workdir,
      self.writer,
      model_id,
    )
