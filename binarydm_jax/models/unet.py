"""The DDPM UNet of Ho et al. (2020) in Flax linen, NHWC.

Blocks follow the openaimodel numbering that BinaryDM's "head and tail" refers to: `input_blocks_0`
is the stem conv, `input_blocks_i` a ResBlock(+attention) or a downsampling conv, `middle_block`,
`output_blocks_i` a ResBlock(+attention)(+upsampling). Each block's output is sown into the
`intermediates` collection as `<block name>_out`, for representation mimicking.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from binarydm_jax.models.layers import LayerFactory, timestep_embedding
from binarydm_jax.quant.activations import timestep_scope

BLOCK_OUTPUT_SUFFIX = "_out"
DOWNSAMPLE_PADDINGS = {
  # TF "SAME" for a stride-2 3x3 conv on an even size pads one row/column at the end (DDPM).
  "asymmetric": ((0, 1), (0, 1)),
  # PyTorch padding=1 (LDM/openaimodel, diffusers downsample_padding=1).
  "symmetric": ((1, 1), (1, 1)),
}


class GroupNorm(nn.Module):
  """GroupNorm with the configured group count and epsilon, computed in float32."""

  groups: int
  eps: float

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.GroupNorm(num_groups=self.groups, epsilon=self.eps, dtype=jnp.float32, name="norm")(x)
    return y.astype(x.dtype)


def nearest_2x(h: jnp.ndarray) -> jnp.ndarray:
  """2x nearest-neighbour upsampling of NHWC feature maps."""
  b, height, width, c = h.shape
  return jax.image.resize(h, (b, 2 * height, 2 * width, c), method="nearest")


def avg_pool_2x(h: jnp.ndarray) -> jnp.ndarray:
  """2x2 average pooling with stride 2 of NHWC feature maps."""
  return nn.avg_pool(h, (2, 2), strides=(2, 2))


RESAMPLERS = {"up": nearest_2x, "down": avg_pool_2x}


class ResBlock(nn.Module):
  """Pre-activation residual block with a timestep projection (DDPM ResnetBlock).

  Called with `temb=None` (the autoencoders) it has no timestep projection. With `scale_shift`
  (LDM's use_scale_shift_norm) the projection has 2*out_ch outputs (scale, shift) and the second
  GroupNorm's output becomes norm(h) * (1 + scale) + shift. With `resample` 'up' or 'down' (LDM's
  resblock_updown) both paths are resampled 2x (nearest / average pooling) after the first
  norm+swish, before the first conv.
  """

  out_ch: int
  dropout: float
  layers: LayerFactory
  norm_groups: int
  norm_eps: float
  scale_shift: bool = False
  resample: str | None = None

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, temb: jnp.ndarray | None, train: bool, skip_split: int | None = None
  ) -> jnp.ndarray:
    """`skip_split`: `x` concatenates two tensors, the first with this many channels."""
    if self.scale_shift and temb is None:
      raise ValueError("ResBlock(scale_shift=True) needs a timestep embedding; got temb=None")
    h = nn.swish(GroupNorm(self.norm_groups, self.norm_eps, name="norm_1")(x))
    if self.resample is not None:
      h, x = RESAMPLERS[self.resample](h), RESAMPLERS[self.resample](x)
    h = self.layers.conv(self.out_ch, name="conv_1")(h)
    emb = None
    if temb is not None:
      emb_ch = 2 * self.out_ch if self.scale_shift else self.out_ch
      emb = self.layers.dense(emb_ch, name="temb_proj")(nn.swish(temb))[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = GroupNorm(self.norm_groups, self.norm_eps, name="norm_2")(h) * (1 + scale) + shift
    else:
      h = GroupNorm(self.norm_groups, self.norm_eps, name="norm_2")(h if emb is None else h + emb)
    h = nn.swish(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = self.layers.conv(self.out_ch, zero_init=True, name="conv_2")(h)
    if x.shape[-1] != self.out_ch:
      x = self.layers.conv(
        self.out_ch, (1, 1), padding=((0, 0), (0, 0)), name="skip", input_split=skip_split
      )(x)
    return x + h


def attention_heads(channels: int, num_head_channels: int, num_heads: int) -> int:
  """Heads of an attention layer: channels // num_head_channels, else num_heads, else one."""
  if num_head_channels != -1:
    return channels // num_head_channels
  return 1 if num_heads == -1 else num_heads


class AttnBlock(nn.Module):
  """Spatial multi-head self-attention with a residual connection (DDPM AttnBlock).

  q, k and v are separate projections whose outputs are (heads, head_dim) in that order, as in
  diffusers. LDM's fused `qkv` projection (QKVAttentionLegacy) computes the same function up to a
  permutation of its output channels; `convert.diffusers_unet.split_legacy_qkv` converts it.
  """

  layers: LayerFactory
  norm_groups: int
  norm_eps: float
  num_head_channels: int  # -1: `num_heads` heads.
  num_heads: int = -1  # Used when num_head_channels is -1; -1 with it: a single head.

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, height, width, c = x.shape
    heads = attention_heads(c, self.num_head_channels, self.num_heads)
    h = GroupNorm(self.norm_groups, self.norm_eps, name="norm")(x)
    q, k, v = (
      self.layers.dense(c, name=name)(h).reshape(b, height * width, heads, c // heads)
      for name in ("q", "k", "v")
    )
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(c // heads)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, height, width, c)
    return x + self.layers.dense(c, zero_init=True, name="proj_out")(out)


def upsample_2x(h: jnp.ndarray, layers: LayerFactory, name: str) -> jnp.ndarray:
  """2x nearest-neighbour upsampling then a 3x3 conv named `name` (call inside a compact method)."""
  return layers.conv(h.shape[-1], name=name)(nearest_2x(h))


def _res_block(owner: nn.Module, out_ch: int, name: str, resample: str | None = None) -> ResBlock:
  """A ResBlock with the norm, dropout and LDM options of `owner` (a UNet or ResAttnBlock)."""
  return ResBlock(
    out_ch,
    owner.dropout,
    owner.layers,
    owner.norm_groups,
    owner.norm_eps,
    scale_shift=owner.use_scale_shift_norm,
    resample=resample,
    name=name,
  )


def _attn_block(owner: nn.Module, name: str) -> AttnBlock:
  """An AttnBlock with the norm and head settings of `owner` (a UNet or ResAttnBlock)."""
  return AttnBlock(
    owner.layers,
    owner.norm_groups,
    owner.norm_eps,
    owner.num_head_channels,
    owner.num_heads,
    name=name,
  )


class ResAttnBlock(nn.Module):
  """One encoder/decoder block: ResBlock, optional attention, optional 2x upsampling.

  The upsampling is a nearest resize and a conv, or with `resblock_updown` an upsampling ResBlock.
  """

  out_ch: int
  use_attn: bool
  upsample: bool
  dropout: float
  layers: LayerFactory
  norm_groups: int
  norm_eps: float
  num_head_channels: int
  num_heads: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, temb: jnp.ndarray, train: bool, skip_split: int | None = None
  ) -> jnp.ndarray:
    """`skip_split`: `x` concatenates the decoder's features (this many channels) and a skip."""
    h = _res_block(self, self.out_ch, "res")(x, temb, train, skip_split)
    if self.use_attn:
      h = _attn_block(self, "attn")(h)
    if self.upsample and self.resblock_updown:
      h = _res_block(self, self.out_ch, "upsample", resample="up")(h, temb, train)
    elif self.upsample:
      h = upsample_2x(h, self.layers, "upsample")
    return h


class UNet(nn.Module):
  """Epsilon-prediction UNet: `apply(params, x[N,H,W,C], t[N], train)` -> eps[N,H,W,C].

  The defaults are DDPM's UNet; `num_heads`, `use_scale_shift_norm` and `resblock_updown` are the
  options of LDM's openaimodel UNet of the same names.
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  out_channels: int = 3
  dropout: float = 0.1
  num_head_channels: int = -1
  num_heads: int = -1
  norm_groups: int = 32
  norm_eps: float = 1e-6
  freq_shift: float = 1.0
  flip_sin_to_cos: bool = False
  downsample_padding: str = "asymmetric"
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  layers: LayerFactory = dataclasses.field(default_factory=LayerFactory)

  def _sow_block(self, name: str, h: jnp.ndarray) -> None:
    """Records a block's output as `intermediates/<name>_out` (the block's own scope is `<name>`)."""
    self.sow("intermediates", name + BLOCK_OUTPUT_SUFFIX, h)

  def _block(self, out_ch: int, resolution: int, upsample: bool, name: str) -> ResAttnBlock:
    return ResAttnBlock(
      out_ch,
      use_attn=resolution in self.attn_resolutions,
      upsample=upsample,
      dropout=self.dropout,
      layers=self.layers,
      norm_groups=self.norm_groups,
      norm_eps=self.norm_eps,
      num_head_channels=self.num_head_channels,
      num_heads=self.num_heads,
      use_scale_shift_norm=self.use_scale_shift_norm,
      resblock_updown=self.resblock_updown,
      name=name,
    )

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if self.downsample_padding not in DOWNSAMPLE_PADDINGS:
      raise ValueError(
        f"downsample_padding={self.downsample_padding!r}; expected one of "
        f"{sorted(DOWNSAMPLE_PADDINGS)}"
      )
    with timestep_scope(t):  # Timestep-grouped activation quantizers read t (quant/activations).
      return self._denoise(x, t, train)

  def _denoise(self, x: jnp.ndarray, t: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = x.astype(self.layers.dtype)
    temb = timestep_embedding(t, self.ch, self.freq_shift, self.flip_sin_to_cos)
    temb = self.layers.dense(4 * self.ch, name="time_embed_0")(temb.astype(self.layers.dtype))
    temb = self.layers.dense(4 * self.ch, name="time_embed_1")(nn.swish(temb))

    resolution = x.shape[1]
    h = self.layers.conv(self.ch, name="conv_in")(x)
    self._sow_block("input_blocks_0", h)
    skips = [h]
    block = 1
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        name = f"input_blocks_{block}"
        h = self._block(self.ch * mult, resolution, False, name)(h, temb, train)
        self._sow_block(name, h)
        skips.append(h)
        block += 1
      if level != len(self.ch_mult) - 1:
        name = f"input_blocks_{block}"
        if self.resblock_updown:
          h = _res_block(self, h.shape[-1], name, resample="down")(h, temb, train)
        else:
          pad = DOWNSAMPLE_PADDINGS[self.downsample_padding]
          h = self.layers.conv(h.shape[-1], strides=(2, 2), padding=pad, name=name)(h)
        self._sow_block(name, h)
        skips.append(h)
        resolution //= 2
        block += 1

    h = _res_block(self, h.shape[-1], "middle_res_0")(h, temb, train)
    h = _attn_block(self, "middle_attn")(h)
    h = _res_block(self, h.shape[-1], "middle_res_1")(h, temb, train)
    self._sow_block("middle_block", h)

    block = 0
    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        name = f"output_blocks_{block}"
        upsample = level != 0 and i == self.num_res_blocks
        split = h.shape[-1]
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._block(self.ch * mult, resolution, upsample, name)(h, temb, train, split)
        self._sow_block(name, h)
        resolution *= 2 if upsample else 1
        block += 1

    h = nn.swish(GroupNorm(self.norm_groups, self.norm_eps, name="norm_out")(h))
    h = self.layers.conv(self.out_channels, zero_init=True, name="conv_out")(h)
    return h.astype(jnp.float32)


def unet_from_config(
  model_config: ml_collections.ConfigDict, layers: LayerFactory | None = None
) -> UNet:
  """Builds the UNet from the `config.model` section (see configs/default.py for the fields)."""
  dtype = jnp.dtype(model_config.get("dtype", "float32"))
  return UNet(
    ch=model_config.ch,
    ch_mult=tuple(model_config.ch_mult),
    num_res_blocks=model_config.num_res_blocks,
    attn_resolutions=tuple(model_config.attn_resolutions),
    out_channels=model_config.channels,
    dropout=model_config.dropout,
    num_head_channels=model_config.get("num_head_channels", -1),
    num_heads=model_config.get("num_heads", -1),
    norm_groups=model_config.get("norm_groups", 32),
    norm_eps=model_config.get("norm_eps", 1e-6),
    freq_shift=model_config.get("freq_shift", 1.0),
    flip_sin_to_cos=model_config.get("flip_sin_to_cos", False),
    downsample_padding=model_config.get("downsample_padding", "asymmetric"),
    use_scale_shift_norm=model_config.get("use_scale_shift_norm", False),
    resblock_updown=model_config.get("resblock_updown", False),
    layers=layers or LayerFactory(dtype=dtype),
  )


def param_shapes(model: nn.Module, image_shape: Sequence[int]) -> dict[str, Any]:
  """The `params` tree of `model` on (H, W, C) images, as jax.ShapeDtypeStruct leaves (no compute)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), x, t)["params"]


def config_param_shapes(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`param_shapes` of the full-precision UNet that `model_config` builds, at its image size."""
  size = model_config.image_size
  return param_shapes(unet_from_config(model_config), (size, size, model_config.channels))


def count_params(params: Any) -> int:
  """Total number of scalars in a param tree."""
  return sum(x.size for x in jax.tree.leaves(params))
