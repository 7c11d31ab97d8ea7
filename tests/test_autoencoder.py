"""First-stage autoencoders: parity with diffusers VQModel / AutoencoderKL, CompVis naming, errors.

The diffusers models are randomly initialised with the published architectures at smaller widths;
the CompVis state dicts are built from diffusers' by renaming (CompVis' key layout, derived from
its model definition: `encoder.down.L.block.J`, `mid.block_1/attn_1/block_2`, 1x1-conv attention,
`nin_shortcut`, `norm_out`, decoder `up.L` counted from the finest level).
"""

import functools
import inspect
import re

import diffusers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from binarydm_jax.convert import diffusers_autoencoder as conv
from binarydm_jax.errors import ConfigError, TeacherError
from binarydm_jax.models import autoencoder as ae

SIZE = 32
# VQ-f4 layout (3 levels, 2 res blocks, GroupNorm(32)) at widths (32, 64, 64); latent_channels 4
# with a 3-dim codebook, to tell z_channels from embed_dim.
VQ_KWARGS = {
  "block_out_channels": (32, 64, 64),
  "down_block_types": ("DownEncoderBlock2D",) * 3,
  "up_block_types": ("UpDecoderBlock2D",) * 3,
  "layers_per_block": 2,
  "latent_channels": 4,
  "vq_embed_dim": 3,
  "num_vq_embeddings": 64,
  "norm_num_groups": 32,
}
# KL-f8 layout (4 levels, 2 res blocks) at widths (16, 32, 64, 64) with GroupNorm(8).
KL_KWARGS = {
  "block_out_channels": (16, 32, 64, 64),
  "down_block_types": ("DownEncoderBlock2D",) * 4,
  "up_block_types": ("UpDecoderBlock2D",) * 4,
  "layers_per_block": 2,
  "latent_channels": 4,
  "norm_num_groups": 8,
}
# The published first_stage_config sections (configs/latent-diffusion/*.yaml).
COMPVIS_VQ_F4 = {
  "target": "ldm.models.autoencoder.VQModelInterface",
  "params": {
    "embed_dim": 3,
    "n_embed": 8192,
    "ddconfig": {
      "double_z": False,
      "z_channels": 3,
      "resolution": 256,
      "in_channels": 3,
      "out_ch": 3,
      "ch": 128,
      "ch_mult": [1, 2, 4],
      "num_res_blocks": 2,
      "attn_resolutions": [],
      "dropout": 0.0,
    },
    "lossconfig": {"target": "torch.nn.Identity"},
  },
}
COMPVIS_KL_F8 = {
  "target": "ldm.models.autoencoder.AutoencoderKL",
  "params": {
    "embed_dim": 4,
    "ddconfig": {
      **COMPVIS_VQ_F4["params"]["ddconfig"],
      "double_z": True,
      "z_channels": 4,
      "ch_mult": [1, 2, 4, 4],
    },
    "lossconfig": {"target": "torch.nn.Identity"},
  },
}


def _random(cls, kwargs, seed):
  """A diffusers model with every tensor random (norms included; a spread-out codebook)."""
  torch.manual_seed(seed)
  model = cls(**kwargs).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_((1.0 if "embedding" in name else 0.05) * torch.randn_like(p))
  return model


def _nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _rel_err(ours, ref):
  ref = np.asarray(ref)
  return float(np.max(np.abs(_nchw(ours) - ref)) / np.max(np.abs(ref)))


def _config_json(model):
  """The model's config as its saved config.json has it (with `_class_name`)."""
  return {"_class_name": type(model).__name__, **model.config}


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


class Converted:
  """A diffusers model, our converted twin, and jitted methods of ours."""

  def __init__(self, torch_model, scale_factor=None):
    self.torch = torch_model
    self.config = conv.config_from_diffusers(_config_json(torch_model), scale_factor)
    self.model = ae.Autoencoder(self.config)
    self.params = conv.convert_diffusers_state_dict(_state_dict(torch_model), self.config)
    self.moments = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method="moments"))
    self.decode_latents = jax.jit(
      lambda p, z: self.model.apply({"params": p}, z, method="decode_latents")
    )
    self.encode = jax.jit(functools.partial(ae.encode, self.model))


@pytest.fixture(scope="module")
def vq():
  return Converted(_random(diffusers.VQModel, VQ_KWARGS, seed=0))


@pytest.fixture(scope="module")
def kl():
  return Converted(_random(diffusers.AutoencoderKL, KL_KWARGS, seed=1), scale_factor=0.5)


@pytest.fixture(scope="module")
def images():
  return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def test_diffusers_defaults_are_its_signatures():
  """Our copies of the defaults (for fields a config.json omits) are diffusers' own."""
  for class_name, table in conv.DIFFUSERS_DEFAULTS.items():
    signature = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    assert {k: p.default for k, p in signature.items() if k != "self"} == table


def test_vq_parity(vq, images):
  """Encoder latents, quantized latents (and codes) and decoder output equal diffusers'."""
  with torch.no_grad():
    h = vq.torch.encode(images).latents
    quant, _, (_, _, indices) = vq.torch.quantize(h)
    decoded = vq.torch.decode(h).sample
  moments = vq.moments(vq.params, _nhwc(images))
  assert moments.shape == (2, SIZE // 4, SIZE // 4, 3) and vq.config.factor == 4
  assert _rel_err(moments, h) < 1e-4
  ours_quant, ours_indices = vq.model.apply(
    {"params": vq.params}, moments, method="quantize_latents"
  )
  np.testing.assert_array_equal(np.asarray(ours_indices).reshape(-1), indices.numpy())
  assert len(np.unique(indices.numpy())) > 5  # the codebook really is searched
  assert _rel_err(ours_quant, quant) < 1e-4
  assert _rel_err(vq.decode_latents(vq.params, moments), decoded) < 1e-4


def test_quantizer_chunks(monkeypatch):
  """The chunked codebook search (with a remainder chunk) is the brute-force nearest entry."""
  monkeypatch.setattr(ae, "QUANTIZE_CHUNK", 7)
  quantizer = ae.VectorQuantizer(n_embed=50, embed_dim=3)
  z = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  params = quantizer.init(jax.random.key(1), z)
  codebook = np.asarray(jax.random.normal(jax.random.key(2), (50, 3)))
  quantized, indices = quantizer.apply({"params": {"embedding": codebook}}, z)
  assert params["params"]["embedding"].shape == (50, 3)
  distances = ((np.asarray(z)[..., None, :] - codebook) ** 2).sum(-1)
  np.testing.assert_array_equal(indices, distances.argmin(-1))
  np.testing.assert_array_equal(quantized, codebook[distances.argmin(-1)])


def test_vq_encode_decode_api(vq, images):
  """encode/decode are the LDM's: VQ latents unquantized and unscaled (scale 1), decode quantizes."""
  x = _nhwc(images)
  latents = vq.encode(vq.params, x)
  assert vq.config.scale_factor == 1.0
  np.testing.assert_allclose(latents, vq.moments(vq.params, x), rtol=1e-4, atol=1e-5)
  with torch.no_grad():
    ref = vq.torch.decode(torch.from_numpy(_nchw(latents).copy())).sample
  assert _rel_err(ae.decode(vq.model, vq.params, latents), ref) < 1e-4


def test_kl_parity(kl, images):
  """Posterior mean and logvar, and the decoder output, equal diffusers'."""
  with torch.no_grad():
    posterior = kl.torch.encode(images).latent_dist
    decoded = kl.torch.decode(posterior.mean).sample
  mean, logvar = ae.gaussian_mean_logvar(kl.moments(kl.params, _nhwc(images)))
  assert mean.shape == (2, SIZE // 8, SIZE // 8, 4) and kl.config.factor == 8
  assert _rel_err(mean, posterior.mean) < 1e-4
  assert _rel_err(logvar, posterior.logvar) < 1e-4
  assert _rel_err(kl.decode_latents(kl.params, mean), decoded) < 1e-4


def test_kl_encode_samples_with_rng(kl, images):
  """With an rng, encode returns scale_factor * (mean + std * noise) of the posterior (the mean
  path without rng, and decode's unscaling, are checked by test_compvis_checkpoint[kl])."""
  x = _nhwc(images)
  mean, logvar = ae.gaussian_mean_logvar(kl.moments(kl.params, x))
  rng = jax.random.key(3)
  sample = kl.encode(kl.params, x, rng=rng)
  noise = (sample / kl.config.scale_factor - mean) / jnp.exp(0.5 * logvar)
  np.testing.assert_allclose(noise, jax.random.normal(rng, mean.shape), atol=1e-3)
  assert kl.config.scale_factor == 0.5 and float(jnp.std(noise)) > 0.5


def _to_compvis(state_dict, levels):
  """diffusers first-stage names -> CompVis latent-diffusion names (and 1x1-conv attention)."""
  rules = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.to_out\.0\.", ".proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.upsamplers\.0\.", ".upsample."),
  ]
  out = {}
  for key, value in state_dict.items():
    for pattern, repl in rules:
      key = re.sub(pattern, repl, key)
    match = re.match(r"^decoder\.up_blocks\.(\d+)\.(.*)$", key)
    if match:
      key = f"decoder.up.{levels - 1 - int(match[1])}.{match[2].replace('resnets.', 'block.')}"
    if ".attn_1." in key and key.endswith(".weight") and len(value.shape) == 2:
      value = value.reshape(*value.shape, 1, 1)
    out[conv.COMPVIS_PREFIX + key] = value
  return out


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["vq", "kl"])
def test_compvis_checkpoint(name, request, images):
  """An LDM state dict (first stage + UNet + schedule + scale_factor) converts to the same params,
  and the converted model runs like diffusers'; only first-stage tensors and scale_factor are read."""
  ours = request.getfixturevalue(name)
  state_dict = _to_compvis(_state_dict(ours.torch), len(ours.config.ch_mult))
  assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in state_dict
  assert "first_stage_model.encoder.mid.attn_1.q.weight" in state_dict
  extra = {"model.diffusion_model.out.2.weight": np.zeros((3, 3)), "betas": np.zeros(1000)}
  if name == "kl":
    extra["scale_factor"] = torch.tensor(0.25)
  config = conv.config_from_diffusers(_config_json(ours.torch), scale_factor=1.0)
  new_config, params = conv.convert_compvis_state_dict({**state_dict, **extra}, config)
  assert new_config.scale_factor == (0.25 if name == "kl" else 1.0)
  _assert_same_tree(params, ours.params)
  with torch.no_grad():
    encoded = ours.torch.encode(images)
    ref = ours.torch.decode(encoded.latent_dist.mean if name == "kl" else encoded.latents).sample
  model = ae.Autoencoder(new_config)
  out = ae.decode(model, params, ae.encode(model, params, _nhwc(images)))
  assert _rel_err(out, ref) < 1e-4


def _published_state_dict(cls, config):
  """Names and shapes of the published first stage (built on torch's meta device), zeros."""
  kwargs = {
    "block_out_channels": tuple(config.ch * m for m in config.ch_mult),
    "down_block_types": ("DownEncoderBlock2D",) * len(config.ch_mult),
    "up_block_types": ("UpDecoderBlock2D",) * len(config.ch_mult),
    "layers_per_block": config.num_res_blocks,
    "latent_channels": config.z_channels,
  }
  if config.kind == "vq":
    kwargs["num_vq_embeddings"] = config.n_embed
  with torch.device("meta"):
    shapes = {k: tuple(v.shape) for k, v in cls(**kwargs).state_dict().items()}
  zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  return _to_compvis(zeros, len(config.ch_mult))


@pytest.mark.parametrize(
  "yaml_section, preset, cls, count",
  [
    (COMPVIS_VQ_F4, ae.VQ_F4, diffusers.VQModel, 55_322_782),
    (COMPVIS_KL_F8, ae.KL_F8, diffusers.AutoencoderKL, 83_653_863),
  ],
  ids=["vq-f4", "kl-f8"],
)
def test_published_architectures(yaml_section, preset, cls, count):
  """The published yaml gives our presets, and a state dict with the published names and shapes
  converts completely (every tensor consumed) into the full-size model."""
  assert conv.config_from_compvis(yaml_section) == preset
  _, params = conv.convert_compvis_state_dict(_published_state_dict(cls, preset), preset)
  assert sum(x.size for x in jax.tree.leaves(params)) == count
  latent = jax.eval_shape(
    lambda x: ae.encode(ae.Autoencoder(preset), params, x),
    jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
  )
  assert latent.shape == (1, *preset.latent_shape(256))
  assert preset.latent_shape(256) == ((64, 64, 3) if preset.kind == "vq" else (32, 32, 4))


def test_other_architecture_lists_differences(vq, kl):
  """A checkpoint of another architecture: the error names the left-over, missing and misshapen
  tensors, in one ConversionError (a TeacherError)."""
  fewer_blocks = conv.config_from_diffusers({**_config_json(vq.torch), "layers_per_block": 1})
  with pytest.raises(TeacherError) as info:
    conv.convert_diffusers_state_dict(_state_dict(vq.torch), fewer_blocks)
  message = str(info.value)
  assert (
    "left-over tensors" in message and "encoder.down_blocks.0.resnets.1.conv1.weight" in message
  )
  assert "\n" not in message

  with pytest.raises(conv.ConversionError) as info:
    conv.convert_diffusers_state_dict(_state_dict(kl.torch), vq.config)
  message = str(info.value)
  assert "missing tensors" in message and "quantize.embedding.weight" in message
  assert "shape mismatches" in message and "quant_conv.weight" in message


def test_checkpoint_without_first_stage():
  """An LDM checkpoint without first_stage_model.* tensors: a one-line error saying so."""
  state_dict = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((3, 3, 3, 3))}
  with pytest.raises(conv.ConversionError, match="no first-stage weights") as info:
    conv.convert_compvis_state_dict(state_dict, ae.VQ_F4)
  assert "\n" not in str(info.value) and "first_stage_model." in str(info.value)


def test_unsupported_configs():
  """Configs our module cannot reproduce are rejected naming the field."""
  with pytest.raises(conv.ConversionError, match="norm_type='spatial'"):
    conv.config_from_diffusers({"_class_name": "VQModel", "norm_type": "spatial"})
  with pytest.raises(conv.ConversionError, match="UNet2DModel"):
    conv.config_from_diffusers({"_class_name": "UNet2DModel"})
  attn = {**COMPVIS_VQ_F4["params"]["ddconfig"], "attn_resolutions": [32]}
  with pytest.raises(conv.ConversionError, match="attn_resolutions"):
    conv.config_from_compvis({**COMPVIS_VQ_F4, "params": {"embed_dim": 3, "ddconfig": attn}})
  with pytest.raises(ConfigError, match="n_embed"):
    ae.AutoencoderConfig(kind="vq", embed_dim=3, z_channels=3)
  with pytest.raises(ConfigError, match="unknown keys"):
    ae.AutoencoderConfig.from_mapping(
      {"kind": "kl", "embed_dim": 4, "z_channels": 4, "ch_multt": 1}
    )
  assert (
    ae.AutoencoderConfig.from_mapping(
      ml_collections.ConfigDict(
        {"kind": "kl", "embed_dim": 4, "z_channels": 4, "ch_mult": [1, 2, 4, 4]}
      )
    )
    == ae.KL_F8
  )
