"""The LDM options of the UNet: scale-shift norm, res-block up/downsampling, heads by count, and
LDM's fused legacy qkv attention layout, against diffusers UNet2DModel and a torch reference.
"""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from binarydm_jax.convert import diffusers_unet, teacher
from binarydm_jax.errors import ConfigError
from binarydm_jax.models.layers import LayerFactory
from binarydm_jax.models.unet import AttnBlock, config_param_shapes, count_params, unet_from_config
from binarydm_jax.quant.presets import block_resolutions
from binarydm_jax.training.config_validation import validate_config
from tests.test_convert_diffusers import (
  SMALL_CONFIG,
  _assert_parity,
  _nchw,
  _nhwc,
  _random_model,
  _rel_err,
  _save,
)

# The LDM-8 (Churches) UNet's options at small widths: scale-shift norm, every 2x resampling a
# ResBlock (ResnetDownsample/UpsampleBlock2D where there is no attention, downsample_type and
# upsample_type 'resnet' where there is), 4 heads of 16 channels at every attention layer.
LDM_CONFIG = {
  "_class_name": "UNet2DModel",
  "sample_size": 16,
  "in_channels": 4,
  "out_channels": 4,
  "block_out_channels": [32, 64, 64],
  "layers_per_block": 1,
  "norm_num_groups": 8,
  "attn_norm_num_groups": 8,  # With scale_shift, diffusers' middle attention has no norm without it.
  "norm_eps": 1e-5,
  "attention_head_dim": 16,
  "downsample_padding": 1,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "resnet_time_scale_shift": "scale_shift",
  "downsample_type": "resnet",
  "upsample_type": "resnet",
  "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
  "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
}


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
  model = _random_model(LDM_CONFIG, seed=2)
  return model, teacher.load_teacher(_save(model, tmp_path_factory.mktemp("ldm")))


def test_ldm_config_maps_onto_the_options(ldm):
  model, (model_config, params) = ldm
  assert model_config.use_scale_shift_norm and model_config.resblock_updown
  assert model_config.num_head_channels == 16 and model_config.attn_resolutions == [8, 4]
  assert count_params(params) == sum(p.numel() for p in model.parameters())
  # The downsampling block is a ResBlock whose timestep projection gives scale and shift.
  assert params["input_blocks_2"]["temb_proj"]["kernel"].shape == (128, 64)
  assert "skip" not in params["input_blocks_2"]
  assert params["output_blocks_1"]["upsample"]["conv_1"]["kernel"].shape == (3, 3, 64, 64)


@pytest.mark.parametrize("heads", ["num_head_channels", "num_heads"])
def test_ldm_parity(ldm, heads):
  """eps of the converted model equals diffusers'; 4 heads by count = 16 channels per head here."""
  model, (model_config, params) = ldm
  if heads == "num_heads":
    model_config = model_config.copy_and_resolve_references()
    model_config.update(num_head_channels=-1, num_heads=4)
  apply = jax.jit(unet_from_config(model_config).apply)
  _assert_parity(model, lambda x, t: apply({"params": params}, x, t), 2, [[0, 999], [17, 500]])


def test_resblock_blocks_are_timestep_blocks(ldm):
  """The quantization presets see the resampling ResBlocks as blocks of their own."""
  resolutions = block_resolutions(unet_from_config(ldm[1][0]), (16, 16, 4))
  assert resolutions["input_blocks_2"] == (16, 8) and resolutions["input_blocks_4"] == (8, 4)
  assert resolutions["output_blocks_1"] == (4, 8) and resolutions["output_blocks_3"] == (8, 16)


def _legacy_attention(x, gn_weight, gn_bias, qkv_w, qkv_b, proj_w, proj_b, heads, groups):
  """LDM's AttentionBlock with QKVAttentionLegacy, from its description, on NCHW torch tensors."""
  b, c, height, width = x.shape
  h = F.group_norm(x, groups, gn_weight, gn_bias, eps=1e-5).reshape(b, c, -1)
  qkv = F.conv1d(h, qkv_w, qkv_b)  # (b, 3c, T): one projection, split per head first
  d = c // heads
  q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
  scale = d**-0.25
  weights = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
  out = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, -1)
  return x + F.conv1d(out, proj_w, proj_b).reshape(b, c, height, width)


@pytest.mark.parametrize("channels, heads", [(32, 4), (64, 4), (64, 1)])
def test_legacy_qkv_layout_is_a_permutation(channels, heads):
  """LDM's fused qkv (heads split before q, k, v), split by the converter, runs in our AttnBlock."""
  gen = torch.Generator().manual_seed(channels + heads)
  tensors = {
    "gn_weight": 1 + 0.1 * torch.randn(channels, generator=gen),
    "gn_bias": 0.1 * torch.randn(channels, generator=gen),
    "qkv_w": torch.randn(3 * channels, channels, 1, generator=gen) / channels**0.5,
    "qkv_b": 0.1 * torch.randn(3 * channels, generator=gen),
    "proj_w": torch.randn(channels, channels, 1, generator=gen) / channels**0.5,
    "proj_b": 0.1 * torch.randn(channels, generator=gen),
  }
  x = torch.randn(2, channels, 8, 8, generator=gen)
  ref = _legacy_attention(x, **tensors, heads=heads, groups=8).numpy()

  def ours(weights, biases):
    """Our AttnBlock with q, k, v projections (torch Linear layout) and the block's other tensors."""

    def dense(weight, bias):
      return {"kernel": diffusers_unet.to_flax(weight, "kernel"), "bias": np.asarray(bias)}

    q, k, v = (dense(w, b) for w, b in zip(weights, biases, strict=True))
    params = {
      "norm": {"norm": {"scale": tensors["gn_weight"].numpy(), "bias": tensors["gn_bias"].numpy()}},
      "q": q,
      "k": k,
      "v": v,
      "proj_out": dense(tensors["proj_w"][..., 0].numpy(), tensors["proj_b"].numpy()),
    }
    block = AttnBlock(LayerFactory(), 8, 1e-5, -1, num_heads=heads)
    return _nchw(block.apply({"params": params}, _nhwc(x)))

  qkv_w, qkv_b = tensors["qkv_w"][..., 0].numpy(), tensors["qkv_b"].numpy()
  split = diffusers_unet.split_legacy_qkv
  assert _rel_err(ours(split(qkv_w, heads), split(qkv_b, heads)), ref) < 1e-5
  if heads > 1:  # Splitting q, k, v first (diffusers' to_q/to_k/to_v order) is another function.
    assert _rel_err(ours(np.split(qkv_w, 3), np.split(qkv_b, 3)), ref) > 1e-2


def test_split_legacy_qkv_rejects_a_head_count_that_does_not_divide():
  with pytest.raises(diffusers_unet.ConversionError, match="num_heads"):
    diffusers_unet.split_legacy_qkv(np.zeros((96, 32)), 5)


def test_defaults_keep_the_ddpm_unet():
  """Configs without the LDM fields build the same params as with them set to their defaults."""
  from configs import cifar

  config = cifar.get_config().model
  shapes = jax.eval_shape(
    lambda: unet_from_config(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.ones(1))
  )
  explicit = config.copy_and_resolve_references()
  explicit.update(num_heads=-1, use_scale_shift_norm=False, resblock_updown=False)
  explicit_shapes = jax.eval_shape(
    lambda: unet_from_config(explicit).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.ones(1)
    )
  )
  assert flax.traverse_util.flatten_dict(shapes) == flax.traverse_util.flatten_dict(explicit_shapes)
  teacher.assert_same_architecture(config, explicit)
  with pytest.raises(teacher.TeacherError, match="use_scale_shift_norm.*resblock_updown"):
    teacher.assert_same_architecture(
      config, {**explicit, "use_scale_shift_norm": True, "resblock_updown": True}
    )


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("resnet_time_scale_shift", "spatial", "resnet_time_scale_shift='spatial'"),
    ("attn_norm_num_groups", None, "attn_norm_num_groups=None.*no GroupNorm"),
    ("downsample_type", "conv", "downsample_type='conv'.*\\['conv', 'resnet'\\]"),
    ("upsample_type", None, "upsample_type=None.*\\['conv', 'resnet'\\]"),
    (
      "down_block_types",
      ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
      "'DownBlock2D'.*\\['conv', 'resnet'\\]",
    ),
  ],
)
def test_mixed_or_unsupported_ldm_fields_are_named(field, value, match):
  with pytest.raises(diffusers_unet.ConversionError, match=match):
    diffusers_unet.model_config_from_diffusers({**LDM_CONFIG, field: value})


def test_conv_resampling_stays_the_default():
  model_config = diffusers_unet.model_config_from_diffusers(SMALL_CONFIG)
  assert not model_config.use_scale_shift_norm and not model_config.resblock_updown


@pytest.mark.parametrize(
  "updates, match",
  [
    ({"num_heads": 0}, r"config\.model\.num_heads=0: expected -1"),
    ({"num_heads": 3}, r"config\.model\.num_heads=3: must divide"),
    ({"num_heads": 2, "num_head_channels": 8}, r"config\.model\.num_heads=2: set either it"),
    ({"use_scale_shift_norm": 1}, r"config\.model\.use_scale_shift_norm=1: expected True"),
    ({"resblock_updown": "yes"}, r"config\.model\.resblock_updown='yes': expected True"),
  ],
)
def test_validate_config_checks_the_ldm_fields(updates, match):
  from configs import digits

  ldm = {"num_head_channels": -1, "num_heads": 2, "use_scale_shift_norm": True}
  ldm["resblock_updown"] = True
  config = digits.get_config("smoke")
  config.model.update(ldm)
  validate_config(config)
  config = digits.get_config("smoke")  # Fresh: ConfigDict keeps a field's type once it is set.
  config.model.update({**ldm, **updates})
  with pytest.raises(ConfigError, match=match):
    validate_config(config)


def test_ldm8_churches_unet_size():
  """lsun_churches-ldm-kl-8.yaml's UNet has the paper's FP size (Table 2: 1125.2 MB)."""
  model_config = ml_collections.ConfigDict(
    {
      "image_size": 32,
      "channels": 4,
      "ch": 192,
      "ch_mult": (1, 2, 2, 4, 4),
      "num_res_blocks": 2,
      "attn_resolutions": (32, 16, 8, 4),  # ds 1, 2, 4, 8 of the 32x32 latents
      "dropout": 0.0,
      "num_heads": 8,
      "use_scale_shift_norm": True,
      "resblock_updown": True,
    }
  )
  n = count_params(config_param_shapes(model_config))
  assert n == 294_966_916
  assert round(4 * n / 2**20, 1) == 1125.2
