"""First-stage autoencoders of the latent diffusion models (Rombach et al., 2022), Flax linen, NHWC.

The paper's LDMs diffuse in the latent space of a pretrained autoencoder that BinaryDM keeps in
full precision (App. B.1): VQ-f4 for LSUN-Bedrooms and FFHQ (256x256x3 images <-> 64x64x3
latents), KL-f8 for LSUN-Churches (256x256x3 <-> 32x32x4). One module family serves both,
configured by `AutoencoderConfig`:

  encoder: conv_in, per level `num_res_blocks` ResBlocks (GroupNorm + swish, no timestep) and a
    stride-2 conv (all levels but the last), a middle block (ResBlock, single-head attention,
    ResBlock), GroupNorm + swish, conv_out; then the 1x1 `quant_conv`.
  VQ: nearest codebook entry (`quantize/embedding`, n_embed x embed_dim).
  KL: the moments are (mean, logvar) of a diagonal Gaussian.
  decoder: the 1x1 `post_quant_conv`, conv_in, the middle block, per level from the coarsest
    `num_res_blocks + 1` ResBlocks and a 2x nearest upsampling conv (all levels but the finest),
    GroupNorm + swish, conv_out.

The ResBlock, attention block and GroupNorm are the UNet's (`models/unet.py`), with no timestep
embedding. Images are in [-1, 1]; `encode` and `decode` include the LDM `scale_factor`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from binarydm_jax.errors import ConfigError
from binarydm_jax.models.layers import LayerFactory
from binarydm_jax.models.unet import (
  DOWNSAMPLE_PADDINGS,
  AttnBlock,
  GroupNorm,
  ResBlock,
  upsample_2x,
)

KINDS = ("vq", "kl")
# The KL posterior's log-variance is clipped to this range before use (as in the LDM codebase).
LOGVAR_RANGE = (-30.0, 20.0)
# Latent vectors per step of the codebook search (a QUANTIZE_CHUNK x n_embed distance matrix).
QUANTIZE_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Architecture of one first-stage autoencoder (the CompVis `first_stage_config` values).

  Attributes:
    kind: 'vq' (vector-quantized, LDM `VQModelInterface`) or 'kl' (`AutoencoderKL`).
    embed_dim: channels of the latents the diffusion model sees.
    z_channels: channels of the encoder output / decoder input (CompVis `ddconfig.z_channels`).
    n_embed: codebook size (VQ only; 0 for KL).
    ch: channels of the first level.
    ch_mult: channel multiplier per level; the spatial factor is 2 ** (len(ch_mult) - 1).
    num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
    in_channels: image channels into the encoder.
    out_channels: image channels out of the decoder.
    norm_groups: GroupNorm groups (32 in every published model).
    norm_eps: GroupNorm epsilon (1e-6 in every published model).
    scale_factor: latents are `scale_factor * z` (LDM; 1.0 for the VQ models, the data's std
      for LSUN-Churches, stored in that checkpoint as `scale_factor`).
  """

  kind: str
  embed_dim: int
  z_channels: int
  n_embed: int = 0
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4)
  num_res_blocks: int = 2
  in_channels: int = 3
  out_channels: int = 3
  norm_groups: int = 32
  norm_eps: float = 1e-6
  scale_factor: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    problems = []
    if self.kind not in KINDS:
      problems.append(f"kind={self.kind!r} (expected one of {KINDS})")
    if self.kind == "vq" and self.n_embed <= 0:
      problems.append(f"n_embed={self.n_embed} (a VQ autoencoder needs a positive codebook size)")
    if self.kind == "kl" and self.n_embed:
      problems.append(f"n_embed={self.n_embed} (a KL autoencoder has no codebook: set 0)")
    if not self.ch_mult:
      problems.append("ch_mult=() (expected at least one level)")
    widths = [self.ch * m for m in self.ch_mult]
    if any(w % self.norm_groups for w in widths):
      problems.append(f"norm_groups={self.norm_groups} (must divide every width {widths})")
    if problems:
      raise ConfigError("autoencoder config: " + "; ".join(problems))

  @classmethod
  def from_mapping(cls, section: Mapping[str, Any]) -> AutoencoderConfig:
    """Builds the config from a `config.autoencoder`-style mapping (ConfigDict or dict)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - fields)
    if unknown:
      raise ConfigError(
        f"autoencoder config: unknown keys {unknown}; expected some of {sorted(fields)}"
      )
    return cls(**dict(section))

  @property
  def factor(self) -> int:
    """Spatial downsampling factor from images to latents (4 for VQ-f4, 8 for KL-f8)."""
    return 2 ** (len(self.ch_mult) - 1)

  def latent_shape(self, image_size: int) -> tuple[int, int, int]:
    """(H, W, C) of the latents of `image_size` x `image_size` images."""
    return (image_size // self.factor, image_size // self.factor, self.embed_dim)


# configs/latent-diffusion/{lsun_bedrooms,ffhq}-ldm-vq-4.yaml: first_stage_config.params.
VQ_F4 = AutoencoderConfig(kind="vq", embed_dim=3, z_channels=3, n_embed=8192, ch_mult=(1, 2, 4))
# configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml: first_stage_config.params (scale_by_std:
# the scale factor is computed from the data and stored in the LDM checkpoint).
KL_F8 = AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2, 4, 4))


class MidBlock(nn.Module):
  """ResBlock, single-head self-attention, ResBlock, at the coarsest level."""

  layers: LayerFactory
  norm_groups: int
  norm_eps: float

  @nn.compact
  def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
    c = h.shape[-1]
    h = ResBlock(c, 0.0, self.layers, self.norm_groups, self.norm_eps, name="res_0")(h, None, False)
    h = AttnBlock(self.layers, self.norm_groups, self.norm_eps, -1, name="attn")(h)
    return ResBlock(c, 0.0, self.layers, self.norm_groups, self.norm_eps, name="res_1")(
      h, None, False
    )


def _res_block(config: AutoencoderConfig, layers: LayerFactory, out_ch: int, name: str) -> ResBlock:
  return ResBlock(out_ch, 0.0, layers, config.norm_groups, config.norm_eps, name=name)


def _norm_swish_conv(
  h: jnp.ndarray, config: AutoencoderConfig, layers: LayerFactory, features: int
) -> jnp.ndarray:
  """The output head of encoder and decoder: `norm_out`, swish, `conv_out` (in a compact method)."""
  h = nn.swish(GroupNorm(config.norm_groups, config.norm_eps, name="norm_out")(h))
  return layers.conv(features, name="conv_out")(h)


class Encoder(nn.Module):
  """Images [N, H, W, in_channels] -> [N, H/f, W/f, z_channels (x2 for KL: mean, logvar)]."""

  config: AutoencoderConfig
  layers: LayerFactory

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c, layers = self.config, self.layers
    h = layers.conv(c.ch, name="conv_in")(x)
    for level, mult in enumerate(c.ch_mult):
      for j in range(c.num_res_blocks):
        h = _res_block(c, layers, c.ch * mult, f"down_{level}_res_{j}")(h, None, False)
      if level != len(c.ch_mult) - 1:
        pad = DOWNSAMPLE_PADDINGS["asymmetric"]  # torch: pad (0, 1, 0, 1), stride-2 conv
        h = layers.conv(h.shape[-1], strides=(2, 2), padding=pad, name=f"down_{level}_downsample")(
          h
        )
    h = MidBlock(layers, c.norm_groups, c.norm_eps, name="mid")(h)
    return _norm_swish_conv(h, c, layers, c.z_channels * (2 if c.kind == "kl" else 1))


class Decoder(nn.Module):
  """[N, h, w, z_channels] -> images [N, h*f, w*f, out_channels]."""

  config: AutoencoderConfig
  layers: LayerFactory

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    c, layers = self.config, self.layers
    h = layers.conv(c.ch * c.ch_mult[-1], name="conv_in")(z)
    h = MidBlock(layers, c.norm_groups, c.norm_eps, name="mid")(h)
    for level in reversed(range(len(c.ch_mult))):
      for j in range(c.num_res_blocks + 1):
        h = _res_block(c, layers, c.ch * c.ch_mult[level], f"up_{level}_res_{j}")(h, None, False)
      if level != 0:
        h = upsample_2x(h, layers, f"up_{level}_upsample")
    return _norm_swish_conv(h, c, layers, c.out_channels)


class VectorQuantizer(nn.Module):
  """Nearest codebook entry (squared Euclidean distance) per latent vector."""

  n_embed: int
  embed_dim: int

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """z [..., embed_dim] -> (quantized z, the same shape; codebook indices, z.shape[:-1])."""
    bound = 1.0 / self.n_embed
    codebook = self.param(
      "embedding",
      lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound),
      (self.n_embed, self.embed_dim),
    )
    norms = jnp.sum(codebook**2, axis=-1)

    def nearest(vector: jnp.ndarray) -> jnp.ndarray:
      # argmin |z - e|^2 = argmin |e|^2 - 2 z.e, in full float32 so that TPUs pick the same code.
      cross = jnp.matmul(codebook, vector, precision=jax.lax.Precision.HIGHEST)
      return jnp.argmin(norms - 2.0 * cross)

    # In chunks: all distances at once would be N*H*W x n_embed (4 GB for 32 64x64 VQ-f4 latents).
    flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
    indices = jax.lax.map(nearest, flat, batch_size=QUANTIZE_CHUNK)
    quantized = jnp.take(codebook, indices, axis=0).reshape(z.shape).astype(z.dtype)
    return quantized, indices.reshape(z.shape[:-1])


def _conv_1x1(layers: LayerFactory, features: int) -> nn.Module:
  return layers.conv(features, (1, 1), padding=((0, 0), (0, 0)))


class Autoencoder(nn.Module):
  """A first-stage autoencoder. `init` runs `__call__` (encode to the mean, decode).

  Methods (use with `apply(..., method=...)`; no scale factor here):
    moments: images -> `quant_conv` output (VQ: pre-quantization latents; KL: [mean, logvar]).
    quantize_latents: VQ latents -> (nearest codebook entries, indices).
    decode_latents: latents -> images (VQ: quantized first, as the LDM decodes).
  """

  config: AutoencoderConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    layers = LayerFactory(dtype=self.dtype)
    self.encoder = Encoder(c, layers)
    self.quant_conv = _conv_1x1(layers, c.embed_dim * (2 if c.kind == "kl" else 1))
    if c.kind == "vq":
      self.quantize = VectorQuantizer(c.n_embed, c.embed_dim)
    self.post_quant_conv = _conv_1x1(layers, c.z_channels)
    self.decoder = Decoder(c, layers)

  def moments(self, images: jnp.ndarray) -> jnp.ndarray:
    return self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)

  def quantize_latents(self, latents: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    return self.quantize(latents)

  def decode_latents(self, latents: jnp.ndarray) -> jnp.ndarray:
    if self.config.kind == "vq":
      latents, _ = self.quantize(latents)
    h = self.post_quant_conv(latents.astype(self.dtype))
    return self.decoder(h).astype(jnp.float32)

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    moments = self.moments(images)
    return self.decode_latents(moments[..., : self.config.embed_dim])


def gaussian_mean_logvar(moments: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The KL posterior's (mean, clipped logvar) from `Autoencoder.moments` (channels split in 2)."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def encode(
  model: Autoencoder, params: Any, images: jnp.ndarray, rng: jax.Array | None = None
) -> jnp.ndarray:
  """Images -> the latents the diffusion model sees, `scale_factor * z`.

  Args:
    model: the autoencoder (`Autoencoder(config)`).
    params: its `params` collection (e.g. from `convert.diffusers_autoencoder`).
    images: [N, H, W, in_channels] in [-1, 1], H and W multiples of `config.factor`.
    rng: KL only: draw z from the posterior with this key; None takes its mean. VQ latents are
      deterministic (the encoder output before quantization, as the LDM trains on).

  Returns:
    float32 latents [N, H/f, W/f, embed_dim].
  """
  moments = model.apply({"params": params}, images, method=Autoencoder.moments)
  z = moments
  if model.config.kind == "kl":
    z, logvar = gaussian_mean_logvar(moments)
    if rng is not None:
      z = z + jnp.exp(0.5 * logvar) * jax.random.normal(rng, z.shape, z.dtype)
  return model.config.scale_factor * z


def decode(model: Autoencoder, params: Any, latents: jnp.ndarray) -> jnp.ndarray:
  """Latents (`scale_factor * z`, as `encode` returns and the sampler produces) -> images.

  Args:
    model: the autoencoder.
    params: its `params` collection.
    latents: [N, h, w, embed_dim]; VQ latents are snapped to the nearest codebook entry first.

  Returns:
    float32 images [N, h*f, w*f, out_channels], nominally in [-1, 1] (not clipped).
  """
  z = latents / model.config.scale_factor
  return model.apply({"params": params}, z, method=Autoencoder.decode_latents)


def param_shapes(model: Autoencoder, image_size: int = 64) -> dict[str, Any]:
  """The `params` tree of `model` as jax.ShapeDtypeStruct leaves (no compute)."""
  c = model.config
  x = jax.ShapeDtypeStruct((1, image_size, image_size, c.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
