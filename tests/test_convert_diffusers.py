"""diffusers UNet2DModel -> Flax UNet: number-for-number parity, tensor bookkeeping, sampler parity.

torch and diffusers are test requirements only (requirements-test.txt).
"""

import json
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from binarydm_jax import diffusion
from binarydm_jax.convert import cli, diffusers_unet, teacher  # noqa: E402
from binarydm_jax.models.unet import UNet, count_params, unet_from_config  # noqa: E402

CIFAR10_CONFIG = diffusers_unet.DDPM_CIFAR10_CONFIG
# Different in every option the converter maps: multi-head attention at the top level, symmetric
# downsample padding, [cos, sin] embedding without shift, 1 channel, norm eps 1e-5.
SMALL_CONFIG = {
  "_class_name": "UNet2DModel",
  "sample_size": 16,
  "in_channels": 1,
  "out_channels": 1,
  "block_out_channels": [32, 64],
  "layers_per_block": 1,
  "norm_num_groups": 8,
  "norm_eps": 1e-5,
  "attention_head_dim": 8,
  "downsample_padding": 1,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
}


def _kwargs(config):
  return {k: v for k, v in config.items() if not k.startswith("_")}


def _random_model(config, seed=0):
  """A diffusers UNet2DModel whose every tensor is random (GroupNorm scales/biases included)."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**_kwargs(config)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model


def _save(model, path, config=None):
  model.save_pretrained(path)  # safetensors
  if config is not None:  # the config file exactly as published instead of diffusers' full dump
    (path / "config.json").write_text(json.dumps(config))
  return path


def _rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _assert_parity(model, apply, batch, timesteps_list, seed=0):
  """Same random NCHW inputs and timesteps through diffusers and through `apply` (NHWC)."""
  gen = torch.Generator().manual_seed(seed)
  size, ch = model.config.sample_size, model.config.in_channels
  for timesteps in timesteps_list:
    x = torch.randn(batch, ch, size, size, generator=gen)
    t = torch.tensor(timesteps)
    with torch.no_grad():
      ref = model(x, t).sample.numpy()
    out = _nchw(apply(_nhwc(x), jnp.asarray(timesteps, jnp.int32)))
    assert out.shape == ref.shape
    assert _rel_err(out, ref) < 1e-4, timesteps


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
  model = _random_model(CIFAR10_CONFIG)
  return model, _save(model, tmp_path_factory.mktemp("cifar"), CIFAR10_CONFIG)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  model = _random_model(SMALL_CONFIG, seed=1)
  return model, _save(model, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def small_converted(small):
  return teacher.load_teacher(small[1])


@pytest.fixture(scope="module")
def small_apply(small_converted):
  """Our converted small model, compiled once for the module: (x_nhwc, t) -> eps."""
  model_config, params = small_converted
  apply = jax.jit(unet_from_config(model_config).apply)
  return lambda x, t: apply({"params": params}, x, t)


def test_defaults_table_is_diffusers_signature():
  """Our copy of UNet2DModel's defaults (used for fields a config.json omits) is diffusers'."""
  import inspect

  signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters
  defaults = {k: p.default for k, p in signature.items() if k != "self"}
  assert defaults == diffusers_unet.DIFFUSERS_UNET2D_DEFAULTS
  assert set(_kwargs(CIFAR10_CONFIG)) <= set(defaults)


def test_cifar10_config_is_our_default_unet():
  model_config = diffusers_unet.model_config_from_diffusers(CIFAR10_CONFIG)
  default = UNet()
  assert model_config.image_size == 32 and model_config.channels == 3
  assert model_config.ch == default.ch
  assert tuple(model_config.ch_mult) == tuple(default.ch_mult)
  assert model_config.num_res_blocks == default.num_res_blocks
  assert tuple(model_config.attn_resolutions) == tuple(default.attn_resolutions)
  for field in ("num_head_channels", "norm_eps", "freq_shift", "flip_sin_to_cos"):
    assert model_config[field] == getattr(default, field), field
  assert model_config.norm_groups == default.norm_groups
  assert model_config.downsample_padding == default.downsample_padding == "asymmetric"


def test_cifar10_config_matches_configs_cifar():
  from configs import cifar

  config = cifar.get_config()
  teacher_config = diffusers_unet.model_config_from_diffusers(CIFAR10_CONFIG)
  teacher.assert_same_architecture(config.model, teacher_config, config.data.image_size)


def test_cifar10_parity(cifar):
  model, path = cifar
  model_config, params = teacher.load_teacher(path)
  n = sum(p.numel() for p in model.parameters())
  assert n == count_params(params) == 35_746_307
  apply = jax.jit(unet_from_config(model_config).apply)
  _assert_parity(model, lambda x, t: apply({"params": params}, x, t), 2, [[3, 999], [0, 500]])


def test_small_config_parity(small, small_converted, small_apply):
  model_config, params = small_converted
  assert model_config.num_head_channels == 8 and model_config.downsample_padding == "symmetric"
  assert model_config.attn_resolutions == [16] and not model_config.freq_shift
  assert count_params(params) == sum(p.numel() for p in small[0].parameters())
  _assert_parity(small[0], small_apply, 3, [[0, 17, 999], [1, 250, 998]])


def test_bin_checkpoint_gives_the_same_params(small, small_converted, tmp_path):
  model, path = small
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  torch.save(model.state_dict(), tmp_path / diffusers_unet.BIN_NAME)
  _, params = teacher.load_teacher(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, small_converted[1])


def test_pipeline_layout_and_deprecated_attention_names(small, small_converted, tmp_path):
  """A pipeline dir with unet/, whose attention tensors use the pre-0.14 names (query, ...)."""
  model, path = small
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state_dict = {}
  for key, value in diffusers_unet.read_state_dict(path).items():
    for new, old in renames.items():
      key = key.replace(f".{new}.", f".{old}.")
    state_dict[key] = value
  assert any(".query." in k for k in state_dict)
  unet_dir = tmp_path / "unet"
  unet_dir.mkdir()
  (unet_dir / "config.json").write_text((path / "config.json").read_text())
  import safetensors.numpy

  safetensors.numpy.save_file(state_dict, str(unet_dir / diffusers_unet.SAFETENSORS_NAME))
  _, params = teacher.load_teacher(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, small_converted[1])


def test_missing_and_leftover_tensors_are_listed(small):
  path = small[1]
  model_config = diffusers_unet.model_config_from_diffusers(diffusers_unet.read_config(path))
  state_dict = diffusers_unet.read_state_dict(path)
  del state_dict["mid_block.attentions.0.to_k.weight"]
  state_dict["down_blocks.0.extra.weight"] = np.zeros(3, np.float32)
  state_dict["conv_out.bias"] = np.zeros(5, np.float32)
  with pytest.raises(diffusers_unet.ConversionError) as e:
    diffusers_unet.convert_state_dict(state_dict, model_config)
  message = str(e.value)
  assert "missing tensors" in message and "mid_block.attentions.0.to_k.weight" in message
  assert "middle_attn/k/kernel" in message
  assert "left-over tensors" in message and "down_blocks.0.extra.weight" in message
  assert "shape mismatches" in message and "conv_out.bias" in message


@pytest.mark.parametrize(
  "field, value",
  [
    ("time_embedding_type", "fourier"),
    ("center_input_sample", True),
    ("mid_block_scale_factor", 2),
    ("resnet_time_scale_shift", "spatial"),
    ("act_fn", "gelu"),
    ("add_attention", False),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "UpBlock2D"]),  # attention only on the way down
    ("attention_head_dim", 12),
    ("downsample_padding", 2),
    ("in_channels", 3),
    ("attn_norm_num_groups", 4),
    ("time_embedding_dim", 64),
    ("block_out_channels", [32, 48]),
    ("_class_name", "UNet2DConditionModel"),
    ("downsample_type", "resnet"),  # SMALL_CONFIG downsamples in an AttnDownBlock2D
  ],
)
def test_unsupported_fields_are_named(field, value):
  with pytest.raises(diffusers_unet.ConversionError, match=field):
    diffusers_unet.model_config_from_diffusers({**SMALL_CONFIG, field: value})


def test_missing_defaults_follow_diffusers():
  """Fields absent from config.json take diffusers' defaults (attention_head_dim=8, eps 1e-5)."""
  config = {k: v for k, v in SMALL_CONFIG.items() if k not in ("attention_head_dim", "norm_eps")}
  model_config = diffusers_unet.model_config_from_diffusers(config)
  assert model_config.num_head_channels == 8 and model_config.norm_eps == 1e-5
  model = diffusers.UNet2DModel(**_kwargs(config))
  assert model.mid_block.attentions[0].heads == 64 // 8


def test_cli_orbax_round_trip(small, small_converted, tmp_path):
  out = cli.convert_teacher(small[1], tmp_path / "teacher")
  model_config, params = teacher.load_teacher(out)
  assert model_config == small_converted[0]
  jax.tree.map(np.testing.assert_array_equal, params, small_converted[1])
  with pytest.raises(teacher.TeacherError, match="already exists"):
    cli.convert_teacher(small[1], out)


def test_cli_entry_point(small, tmp_path):
  out = tmp_path / "teacher"
  cmd = [sys.executable, "-m", "binarydm_jax.convert", f"--source={small[1]}", f"--output={out}"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert f"--config.teacher.source={out}" in result.stdout
  bad = cmd[:3] + [f"--source={tmp_path / 'nope'}", f"--output={out}2"]
  result = subprocess.run(bad, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "diffusion_pytorch_model.safetensors" in result.stderr


# --- The samplers with converted weights against diffusers' schedulers, step for step. ---

ddpm_step = jax.jit(diffusion.ddpm_step, static_argnames=("clip_denoised", "variance"))
ddim_step = jax.jit(diffusion.ddim_step, static_argnames=("eta", "clip_denoised"))


def _steps(small, small_apply, scheduler, timesteps, step_ours, seed):
  """Runs diffusers' chain (torch model + scheduler) and checks each of our steps against it.

  At every step both sides start from diffusers' x_t, use their own model (torch vs converted
  Flax weights) and the same noise, so the check is per step and errors do not compound.
  """
  model = small[0]
  size, ch = model.config.sample_size, model.config.in_channels
  x = torch.randn(2, ch, size, size, generator=torch.Generator().manual_seed(seed))
  for i, t in enumerate(timesteps):
    with torch.no_grad():
      eps_theirs = model(x, int(t)).sample
    tt = jnp.full((2,), t, jnp.int32)
    eps_ours = small_apply(_nhwc(x), tt)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1 + i))
    ours = _nchw(step_ours(eps_ours, _nhwc(x), tt, _nhwc(noise), i))
    x = scheduler(eps_theirs, int(t), x, noise, seed + 1 + i)
    # 1 - abar_t is ~1e-4 at t < 3, and both sides compute it in float32 (differently): each is
    # ~1e-4 (relative) off a float64 reference there. Elsewhere they agree to ~1e-6.
    tol = 1e-4 if t >= 3 else 5e-4
    assert _rel_err(ours, x.numpy()) < tol, (int(t), _rel_err(ours, x.numpy()))


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_steps_match_diffusers(small, small_apply, variance, clip):
  sched = diffusers.DDPMScheduler(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type={"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[variance],
    clip_sample=clip,
  )
  schedule = diffusion.linear_schedule(1e-4, 0.02, 1000)
  np.testing.assert_allclose(schedule.alphas_cumprod, sched.alphas_cumprod.numpy(), rtol=2e-6)

  def theirs(eps, t, x, noise, seed):
    # DDPMScheduler draws its noise with torch.randn from the generator: the same `noise`.
    return sched.step(eps, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample

  def ours(eps, x, t, noise, i):
    return ddpm_step(schedule, eps, x, t, noise, clip_denoised=clip, variance=variance)

  # Steps from pure noise, in the middle, and the last steps down to t=0 (no noise added there).
  _steps(small, small_apply, theirs, [999, 998, 500, 10, 3, 2, 1, 0], ours, seed=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_steps_match_diffusers(small, small_apply, eta, clip):
  num_steps = 8
  sched = diffusers.DDIMScheduler(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=clip,
    set_alpha_to_one=True,
    steps_offset=0,
    timestep_spacing="leading",
  )
  sched.set_timesteps(num_steps)
  timesteps = diffusion.ddim_timesteps(1000, num_steps)
  np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())
  prev = np.append(timesteps[1:], -1)
  schedule = diffusion.linear_schedule(1e-4, 0.02, 1000)

  def theirs(eps, t, x, noise, seed):
    return sched.step(eps, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample

  def ours(eps, x, t, noise, i):
    t_prev = jnp.full_like(t, prev[i])
    return ddim_step(schedule, eps, x, t, t_prev, noise, eta=eta, clip_denoised=clip)

  _steps(small, small_apply, theirs, timesteps, ours, seed=7)
