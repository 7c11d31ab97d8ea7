"""The frozen first stage of a latent diffusion job: its config section, its checkpoint, and the
encoding of the training images and decoding of the samples.

The UNet of a latent diffusion job sees latents of `config.data.image_size` (H = W) with
`config.model.channels`; its images are `factor` times larger (`image_size`). The first stage is
never binarized (paper App. B.1): it runs in full precision around the UNet.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from binarydm_jax.data.input_pipeline import ImageDataset
from binarydm_jax.errors import ConfigError, TeacherError
from binarydm_jax.models import autoencoder
from binarydm_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from binarydm_jax.runtime import fileio

KINDS = ("", *autoencoder.KINDS)  # '' = a pixel-space job, no first stage.
# The `config.first_stage` keys that are `AutoencoderConfig` fields (the architecture).
ARCHITECTURE_KEYS = (
  "kind",
  "embed_dim",
  "z_channels",
  "n_embed",
  "ch",
  "ch_mult",
  "num_res_blocks",
  "norm_groups",
  "scale_factor",
)


# The top-level modules of `Autoencoder` that decoding uses.
DECODER_MODULES = ("post_quant_conv", "decoder", "quantize")


class FirstStageError(TeacherError):
  """A first-stage checkpoint that is missing, unreadable or of another architecture."""


def default_config() -> ml_collections.ConfigDict:
  """The `config.first_stage` section: off (''); the architecture fields are VQ-f4's."""
  section = ml_collections.ConfigDict()
  section.kind = ""  # '' (pixel space), 'vq' (LDM-4 VQ-f4) or 'kl' (LDM-8 KL-f8).
  # A converted first stage (`python -m binarydm_jax.convert --ldm_checkpoint=...` writes
  # OUT/first_stage); its architecture must equal the fields below, and its scale_factor is used.
  section.source = ml_collections.config_dict.placeholder(str)
  # No source: a randomly initialised first stage (seed 0), for tests and `:smoke` runs only; its
  # latents carry the images' information but its samples are not images of anything.
  section.random_init = False
  section.embed_dim = 3  # Latent channels (= model.channels).
  section.z_channels = 3
  section.n_embed = 8192  # Codebook size ('vq'; 0 for 'kl').
  section.ch = 128
  section.ch_mult = (1, 2, 4)  # Images are 2 ** (len - 1) times larger than latents.
  section.num_res_blocks = 2
  section.norm_groups = 32
  section.scale_factor = 1.0  # Latents = scale_factor * z (random_init only; else the source's).
  section.encode_batch_size = 64  # Images encoded at a time when the job starts.
  return section


def autoencoder_config(config: ml_collections.ConfigDict) -> AutoencoderConfig | None:
  """The first stage `config.first_stage` names (None for a pixel-space job).

  Raises:
    ConfigError: naming the field, for an unknown kind or an inconsistent architecture.
  """
  section = config.get("first_stage")
  if section is None or not section.kind:
    return None
  if section.kind not in KINDS:
    raise ConfigError(f"config.first_stage.kind={section.kind!r}: expected one of {KINDS}")
  fields = {key: section[key] for key in ARCHITECTURE_KEYS}
  if section.kind == "kl":
    fields["n_embed"] = 0
  ae = AutoencoderConfig(**fields)  # RGB images, as every published first stage.
  if ae.embed_dim != config.model.channels:
    raise ConfigError(
      f"config.model.channels={config.model.channels}: a latent diffusion UNet sees the "
      f"first stage's latents, so it must equal config.first_stage.embed_dim={ae.embed_dim}"
    )
  return ae


def image_size(config: ml_collections.ConfigDict) -> int:
  """Side of the job's images: `data.image_size` (the UNet's input) times the first stage's factor."""
  ae = autoencoder_config(config)
  return config.data.image_size * (ae.factor if ae else 1)


def decoder_params(params: Any) -> dict[str, Any]:
  """The part of the params that sampling needs (decoder, post-quant conv, codebook)."""
  return {key: value for key, value in params.items() if key in DECODER_MODULES}


def _cast(tree: Any, dtype: str) -> Any:
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def save(
  path: str | os.PathLike,
  config: AutoencoderConfig,
  params: Any,
  overwrite: bool = False,
  dtype: str = "float32",
) -> epath.Path:
  """Writes an orbax first-stage checkpoint: items `params` (stored as `dtype`) and `config`.

  `params` may be the whole autoencoder's or only `decoder_params` (an export ships those).
  The VQ codebook stays float32: rounding it would change which entry a latent snaps to.
  """
  import orbax.checkpoint as ocp

  path = fileio.absolute(path)
  if path.exists() and not overwrite:
    raise FirstStageError(f"{path} already exists; remove it or pass --overwrite")
  items = ocp.args.Composite(
    params=ocp.args.StandardSave(
      {key: _cast(tree, "float32" if key == "quantize" else dtype) for key, tree in params.items()}
    ),
    config=ocp.args.JsonSave(
      {"autoencoder": dataclasses.asdict(config), "modules": sorted(params)}
    ),
  )
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(path, items, force=overwrite)
  return path


def _checkpoint_dir(path: str | os.PathLike) -> epath.Path:
  """`path` made absolute, if it looks like a checkpoint written by `save`; else FirstStageError."""
  path = fileio.absolute(path)
  if not ((path / "config").is_dir() and (path / "params").is_dir()):
    raise FirstStageError(
      f"first stage {path}: no first-stage checkpoint there (expected config/ and params/). "
      "Convert the LDM's model.ckpt once: python -m binarydm_jax.convert --ldm_checkpoint=FILE "
      "--config=CONFIG --output=DIR, then pass --config.first_stage.source=DIR/first_stage"
    )
  return path


def check_source(config: ml_collections.ConfigDict) -> None:
  """Fails unless the job's `first_stage.source` (if it has one) holds a first-stage checkpoint.

  Reads no params: what a job checks before any work.

  Raises:
    FirstStageError: no checkpoint written by `save` at the source.
  """
  if autoencoder_config(config) is not None and config.first_stage.source:
    _checkpoint_dir(config.first_stage.source)


def load(path: str | os.PathLike) -> tuple[AutoencoderConfig, Any]:
  """Reads a checkpoint written by `save`; a missing or foreign directory is a one-line error."""
  import orbax.checkpoint as ocp

  path = _checkpoint_dir(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    stored = checkpointer.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore()))
    stored = stored["config"]
    config = AutoencoderConfig(**stored["autoencoder"])
    shapes = autoencoder.param_shapes(Autoencoder(config), image_size=8 * config.factor)
    shapes = {key: shapes[key] for key in stored["modules"]}
    args = ocp.args.Composite(params=ocp.args.StandardRestore())
    params = checkpointer.restore(path, args)["params"]
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  if jax.tree.map(jnp.shape, params) != jax.tree.map(lambda a: a.shape, shapes):
    raise FirstStageError(
      f"first stage {path}: its params do not fit its own config {config}; convert it again"
    )
  return config, params


def check_same_architecture(expected: AutoencoderConfig, found: AutoencoderConfig, where: str):
  """Raises FirstStageError listing the architecture fields (not scale_factor) that differ."""
  diffs = [
    f"{f.name}: config {getattr(expected, f.name)!r} vs checkpoint {getattr(found, f.name)!r}"
    for f in dataclasses.fields(AutoencoderConfig)
    if f.name != "scale_factor" and getattr(expected, f.name) != getattr(found, f.name)
  ]
  if diffs:
    raise FirstStageError(
      f"first stage {where} is not the one config.first_stage describes: " + "; ".join(diffs)
    )


@dataclasses.dataclass(frozen=True)
class FirstStage:
  """A loaded first stage: the module (its config holds the scale factor) and its params."""

  model: Autoencoder
  params: Any

  @property
  def config(self) -> AutoencoderConfig:
    return self.model.config

  @functools.cached_property
  def encoder(self) -> Callable[[jax.Array], jax.Array]:
    """Jitted images [N, H, W, C] in [-1, 1] -> latents (VQ: pre-quantization; KL: the mean).

    One jitted function per first stage, so each batch shape compiles once.
    """
    return jax.jit(lambda images: autoencoder.encode(self.model, self.params, images))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Latents -> images in [-1, 1] (clipped); traceable, so a sampler can decode inside its jit."""
    return jnp.clip(autoencoder.decode(self.model, self.params, latents), -1.0, 1.0)


def from_config(config: ml_collections.ConfigDict) -> FirstStage | None:
  """The job's first stage: loaded from `first_stage.source`, random (`random_init`), or None.

  Raises:
    ConfigError: a first stage with neither source nor random_init.
    FirstStageError: a source that is missing or of another architecture.
  """
  expected = autoencoder_config(config)
  if expected is None:
    return None
  source = config.first_stage.source
  if source:
    found, params = load(source)
    check_same_architecture(expected, found, str(source))
    return FirstStage(Autoencoder(found), params)
  if not config.first_stage.random_init:
    raise ConfigError(
      "config.first_stage.source is not set: a latent diffusion job needs its autoencoder "
      "(python -m binarydm_jax.convert --ldm_checkpoint=model.ckpt --config=CONFIG --output=DIR "
      "writes DIR/first_stage), or --config.first_stage.random_init=True for a smoke run"
    )
  model = Autoencoder(expected)
  size = 8 * expected.factor
  images = jnp.zeros((1, size, size, expected.in_channels))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
  return FirstStage(model, params)


def encode_images(first_stage: FirstStage, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Latents of NHWC images in [-1, 1], float32, computed `batch_size` images at a time."""
  encode = first_stage.encoder
  batches = []
  for start in range(0, len(images), batch_size):
    batches.append(np.asarray(encode(jnp.asarray(images[start : start + batch_size]))))
    done = min(start + batch_size, len(images))
    if done == len(images) or (start // batch_size) % 50 == 0:
      logging.info("Encoded %d / %d images to latents", done, len(images))
  return np.concatenate(batches)


def latent_dataset(first_stage: FirstStage, images: ImageDataset, batch_size: int) -> ImageDataset:
  """`images` encoded to latents: what the UNet trains on (same order, seed and flips).

  With random flips, the flipped images are encoded too (`train_flipped`), so a flipped batch
  holds the latents of flipped images, as the LDM (which encodes every batch) trains on.
  """
  train = encode_images(first_stage, images.train, batch_size)
  flipped = None
  if images.random_flip:
    flipped = encode_images(first_stage, images.train[:, :, ::-1], batch_size)
  return dataclasses.replace(
    images,
    train=train,
    heldout=encode_images(first_stage, images.heldout, batch_size),
    train_flipped=flipped,
  )
