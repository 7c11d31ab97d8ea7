"""CompVis latent-diffusion model.ckpt -> our teacher and first-stage checkpoints.

The fake checkpoints are diffusers `UNet2DModel`s with the LDM-4 (Bedrooms) and LDM-8 (Churches)
UNet options at small widths, their state dicts renamed to the CompVis openaimodel names by the
mapping below (written from the openaimodel structure, q/k/v fused into the legacy `qkv`), plus
a random first stage under `first_stage_model.`, the LDM's `betas` and, for Churches, a
`scale_factor`, saved with torch as a Lightning checkpoint's {'state_dict': ...}.
"""

import re
import subprocess
import sys
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from binarydm_jax.convert import compvis_ldm, compvis_unet, teacher
from binarydm_jax.convert.diffusers_unet import ConversionError
from binarydm_jax.data import first_stage
from binarydm_jax.models.unet import count_params, unet_from_config
from configs import lsun_bedrooms, lsun_churches
from tests.test_autoencoder import _published_state_dict
from tests.test_convert_diffusers import _assert_parity, _random_model
from tests.test_unet_ldm import LDM_CONFIG as CHURCHES_DIFFUSERS

# LDM-4's UNet options at small widths: attention (16 channels per head) at all levels but the
# first, conv resampling, 2 ResBlocks per level.
BEDROOMS_DIFFUSERS = {
  **CHURCHES_DIFFUSERS,
  "in_channels": 3,
  "out_channels": 3,
  "layers_per_block": 2,
  "resnet_time_scale_shift": "default",
  "downsample_type": "conv",
  "upsample_type": "conv",
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
  "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# The same architectures as our job configs' model sections (the :smoke configs, widened).
SMALL_MODELS = {
  "bedrooms": {
    "channels": 3,
    "ch": 32,
    "ch_mult": (1, 2, 2),
    "num_res_blocks": 2,
    "attn_resolutions": (8, 4),
    "num_head_channels": 16,
    "norm_groups": 8,
  },
  "churches": {
    "channels": 4,
    "ch": 32,
    "ch_mult": (1, 2, 2),
    "num_res_blocks": 1,
    "attn_resolutions": (8, 4),
    "num_head_channels": -1,
    "num_heads": 4,  # 64 channels at every attention layer: diffusers' 16 per head.
    "norm_groups": 8,
  },
}
CHURCHES_SCALE = 0.25

# diffusers UNet2DModel sub-module names -> openaimodel names.
_RESNET = {
  "norm1": "in_layers.0",
  "conv1": "in_layers.2",
  "time_emb_proj": "emb_layers.1",
  "norm2": "out_layers.0",
  "conv2": "out_layers.3",
  "conv_shortcut": "skip_connection",
}
_ATTN = {"group_norm": "norm", "to_out.0": "proj_out"}


def _fuse_legacy_qkv(q, k, v, heads):
  """LDM's fused qkv: per head, that head's q, k and v channels (the inverse of the split)."""
  per_head = [x.reshape(heads, x.shape[0] // heads, *x.shape[1:]) for x in (q, k, v)]
  return np.stack(per_head, axis=1).reshape(3 * q.shape[0], *q.shape[1:])


def _to_compvis(state_dict, diffusers_config):
  """A diffusers UNet2DModel state dict under the CompVis openaimodel names and layouts."""
  n = diffusers_config["layers_per_block"]
  down_attn = ["Attn" in t for t in diffusers_config["down_block_types"]]
  levels = len(down_attn)
  head_dim = diffusers_config["attention_head_dim"]

  def block(name):
    """diffusers module path -> openaimodel module path (without the sub-module)."""
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)", name):
      return f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[3])}.{int(m[2] == 'attentions')}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0(\.conv)?", name):
      return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0" + (".op" if m[2] else "")
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)", name):
      return f"middle_block.{1 if m[1] == 'attentions' else 2 * int(m[2])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)", name):
      return f"output_blocks.{int(m[1]) * (n + 1) + int(m[3])}.{int(m[2] == 'attentions')}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0(\.conv)?", name):
      level = levels - 1 - int(m[1])
      index = 2 if down_attn[level] else 1
      return f"output_blocks.{int(m[1]) * (n + 1) + n}.{index}" + (".conv" if m[2] else "")
    raise AssertionError(name)

  top = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
  }
  out, qkv = {}, {}
  for key, value in state_dict.items():
    module, leaf = key.rsplit(".", 1)
    if module in top:
      out[f"{top[module]}.{leaf}"] = value
      continue
    parent, sub = re.fullmatch(r"(\w+\.\d+\.\w+\.\d+|mid_block\.\w+\.\d+)\.(.+)", module).groups()
    if sub in ("to_q", "to_k", "to_v"):
      qkv.setdefault((block(parent), leaf), {})[sub] = value
    elif sub in _ATTN:
      value = value[..., None] if sub == "to_out.0" and leaf == "weight" else value
      out[f"{block(parent)}.{_ATTN[sub]}.{leaf}"] = value
    elif sub == "conv":  # a downsampling / upsampling conv
      out[f"{block(parent + '.conv')}.{leaf}"] = value
    else:
      out[f"{block(parent)}.{_RESNET[sub]}.{leaf}"] = value
  for (name, leaf), parts in qkv.items():
    fused = _fuse_legacy_qkv(
      parts["to_q"], parts["to_k"], parts["to_v"], len(parts["to_q"]) // head_dim
    )
    out[f"{name}.qkv.{leaf}"] = fused[..., None] if leaf == "weight" else fused
  return {compvis_unet.PREFIX + k: v for k, v in out.items()}


def _job_config(name):
  module = {"bedrooms": lsun_bedrooms, "churches": lsun_churches}[name]
  config = module.get_config("smoke")
  config.model.update(SMALL_MODELS[name])
  config.data.image_size = 16
  return config


def _ldm_betas(config):
  """The LDM's make_beta_schedule('linear'): linspace of sqrt(beta) in float64, squared."""
  d = config.diffusion
  sqrt = torch.linspace(d.beta_start**0.5, d.beta_end**0.5, d.num_timesteps, dtype=torch.float64)
  return (sqrt**2).to(torch.float32)


def _first_stage(config, seed):
  """A random first stage with the config's architecture, under the CompVis names."""
  ae_config = first_stage.autoencoder_config(config)
  cls = diffusers.VQModel if ae_config.kind == "vq" else diffusers.AutoencoderKL
  rng = np.random.default_rng(seed)
  zeros = _published_state_dict(cls, ae_config)
  return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in zeros.items()}


class Fake:
  """A fake LDM model.ckpt: a random diffusers UNet (EMA weights for Bedrooms) + first stage."""

  def __init__(self, name, path):
    diffusers_config = {"bedrooms": BEDROOMS_DIFFUSERS, "churches": CHURCHES_DIFFUSERS}[name]
    self.model = _random_model(diffusers_config, seed=3)
    self.config = _job_config(name)
    unet = _to_compvis({k: v.numpy() for k, v in self.model.state_dict().items()}, diffusers_config)
    self.state_dict = {**_first_stage(self.config, seed=4), "betas": _ldm_betas(self.config)}
    if name == "bedrooms":  # The UNet's EMA copy is the diffusers model, the trained one is not.
      self.trained = {k: v + 0.5 for k, v in unet.items()}
      self.state_dict.update(self.trained)
      prefix = len(compvis_unet.PREFIX)
      self.state_dict.update(
        {f"model_ema.diffusion_model{k[prefix:].replace('.', '')}": v for k, v in unet.items()}
      )
      self.state_dict.update({"model_ema.decay": 0.9999, "model_ema.num_updates": 5})
    else:
      self.state_dict.update(unet)
      self.state_dict["scale_factor"] = CHURCHES_SCALE
    self.state_dict = {k: torch.as_tensor(v) for k, v in self.state_dict.items()}
    self.path = path / "model.ckpt"
    torch.save({"state_dict": self.state_dict, "global_step": 7}, self.path)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
  return {name: Fake(name, tmp_path_factory.mktemp(name)) for name in ("bedrooms", "churches")}


@pytest.fixture(scope="module", params=["bedrooms", "churches"])
def converted(request, fakes):
  fake = fakes[request.param]
  return fake, compvis_ldm.convert_ldm_checkpoint(fake.path, fake.config, fake.path.parent / "out")


def test_unet_parity(converted):
  """eps of the written teacher equals the diffusers model's (Bedrooms: the EMA weights)."""
  fake, (teacher_path, _) = converted
  model_config, params = teacher.load_teacher(teacher_path)
  teacher.assert_same_architecture(fake.config.model, model_config, fake.config.data.image_size)
  assert count_params(params) == sum(p.numel() for p in fake.model.parameters())
  apply = jax.jit(unet_from_config(model_config).apply)
  _assert_parity(fake.model, lambda x, t: apply({"params": params}, x, t), 2, [[0, 999], [17, 500]])


def test_first_stage_written(converted):
  """The first stage loads back with the config's architecture, the checkpoint's tensors and
  (Churches) its scale_factor."""
  fake, (_, stage_path) = converted
  ae_config, params = first_stage.load(stage_path)
  first_stage.check_same_architecture(
    first_stage.autoencoder_config(fake.config), ae_config, str(stage_path)
  )
  expected_scale = CHURCHES_SCALE if "scale_factor" in fake.state_dict else 1.0
  assert ae_config.scale_factor == pytest.approx(expected_scale)
  conv_in = fake.state_dict["first_stage_model.encoder.conv_in.weight"].numpy()
  np.testing.assert_array_equal(
    params["encoder"]["conv_in"]["kernel"], conv_in.transpose(2, 3, 1, 0)
  )


def test_trained_weights_without_ema(fakes):
  """use_ema=False takes model.diffusion_model.* (here: the EMA weights + 0.5)."""
  fake = fakes["bedrooms"]
  weights = compvis_ldm.convert_state_dict(fake.state_dict, fake.config, use_ema=False)
  kernel = fake.trained["model.diffusion_model.input_blocks.0.0.weight"].transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(weights.params["conv_in"]["kernel"], kernel)


# --- Full-size names and shapes, from the openaimodel structure written out here. ---


def _openaimodel_shapes(in_ch, ch, mult, n, attn_ds, scale_shift, updown):
  """openaimodel UNetModel's state dict names -> shapes, built as its __init__ builds modules."""
  shapes, emb = {}, 4 * ch

  def param(name, weight, out):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = weight, (out,)

  def res(name, i, o):
    param(f"{name}.in_layers.0", (i,), i)
    param(f"{name}.in_layers.2", (o, i, 3, 3), o)
    param(f"{name}.emb_layers.1", (2 * o if scale_shift else o, emb), 2 * o if scale_shift else o)
    param(f"{name}.out_layers.0", (o,), o)
    param(f"{name}.out_layers.3", (o, o, 3, 3), o)
    if i != o:
      param(f"{name}.skip_connection", (o, i, 1, 1), o)

  def attn(name, c):
    param(f"{name}.norm", (c,), c)
    param(f"{name}.qkv", (3 * c, c, 1), 3 * c)
    param(f"{name}.proj_out", (c, c, 1), c)

  param("time_embed.0", (emb, ch), emb)
  param("time_embed.2", (emb, emb), emb)
  param("input_blocks.0.0", (ch, in_ch, 3, 3), ch)
  chans, cur, ds, b = [ch], ch, 1, 1
  for level, m in enumerate(mult):
    for _ in range(n):
      res(f"input_blocks.{b}.0", cur, m * ch)
      cur = m * ch
      if ds in attn_ds:
        attn(f"input_blocks.{b}.1", cur)
      chans.append(cur)
      b += 1
    if level != len(mult) - 1:
      if updown:
        res(f"input_blocks.{b}.0", cur, cur)
      else:
        param(f"input_blocks.{b}.0.op", (cur, cur, 3, 3), cur)
      chans.append(cur)
      b, ds = b + 1, ds * 2
  res("middle_block.0", cur, cur)
  attn("middle_block.1", cur)
  res("middle_block.2", cur, cur)
  b = 0
  for level, m in reversed(list(enumerate(mult))):
    for i in range(n + 1):
      res(f"output_blocks.{b}.0", cur + chans.pop(), m * ch)
      cur, j = m * ch, 1
      if ds in attn_ds:
        attn(f"output_blocks.{b}.1", cur)
        j = 2
      if level and i == n:
        if updown:
          res(f"output_blocks.{b}.{j}", cur, cur)
        else:
          param(f"output_blocks.{b}.{j}.conv", (cur, cur, 3, 3), cur)
        ds //= 2
      b += 1
  param("out.0", (cur,), cur)
  param("out.2", (in_ch, cur, 3, 3), in_ch)
  return shapes


# The published yaml `unet_config.params` (bedrooms.yaml, lsun_churches-ldm-kl-8.yaml) and sizes.
PUBLISHED = {
  "bedrooms": (lsun_bedrooms, (3, 224, (1, 2, 3, 4), 2, (2, 4, 8), False, False), 274_056_163),
  "churches": (lsun_churches, (4, 192, (1, 2, 2, 4, 4), 2, (1, 2, 4, 8), True, True), 294_966_916),
}


def _zeros(shapes, prefix=compvis_unet.PREFIX):
  """Arrays of these shapes that take no memory (broadcast zeros), named with `prefix`."""
  return {prefix + k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_names_and_shapes(name):
  module, args, size = PUBLISHED[name]
  expected = _openaimodel_shapes(*args)
  assert sum(int(np.prod(s)) for s in expected.values()) == size
  model_config = compvis_ldm.teacher_model_config(module.get_config())
  assert compvis_unet.state_dict_shapes(model_config) == expected
  compvis_unet.check_shapes(_zeros(expected, prefix=""), model_config)  # Passes: nothing differs.


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_size_converts_and_runs(name):
  """A full-size zeros state dict converts completely and the UNet runs one step on it."""
  module, args, size = PUBLISHED[name]
  config = module.get_config()
  model_config = compvis_ldm.teacher_model_config(config)
  params = compvis_unet.convert_state_dict(_zeros(_openaimodel_shapes(*args)), model_config)
  assert count_params(params) == size
  s, c = config.data.image_size, config.model.channels
  eps = unet_from_config(model_config).apply(
    {"params": params}, jnp.ones((1, s, s, c)), jnp.array([10])
  )
  assert eps.shape == (1, s, s, c) and float(jnp.abs(eps).max()) == 0.0


# --- Errors. ---


def test_checkpoint_of_another_model():
  """Bedrooms' UNet with the Churches config: one line naming tensors of other shapes, missing
  and unexpected ones, a few of each with their counts."""
  module, args, _ = PUBLISHED["bedrooms"]
  churches = compvis_ldm.teacher_model_config(lsun_churches.get_config())
  with pytest.raises(ConversionError) as info:
    compvis_unet.convert_state_dict(_zeros(_openaimodel_shapes(*args)), churches)
  message = str(info.value)
  assert "\n" not in message and "another model than the config names" in message
  assert (
    "model.diffusion_model.input_blocks.0.0.weight (224, 3, 3, 3) (config: (192, 4, 3, 3))"
    in message
  )
  assert re.search(r"\d+ of other shapes: .*\(\d+ more\)", message)
  assert re.search(r"\d+ missing: model\.diffusion_model\.input_blocks\.", message)
  assert re.search(r"\d+ unexpected: model\.diffusion_model\.input_blocks\.", message)
  assert "ch=192" in message and "resblock_updown=True" in message


def test_checkpoint_without_first_stage(converted):
  fake, _ = converted
  unet_only = {k: v for k, v in fake.state_dict.items() if not k.startswith("first_stage_model.")}
  with pytest.raises(ConversionError, match="no first-stage weights") as info:
    compvis_ldm.convert_state_dict(unet_only, fake.config)
  assert "\n" not in str(info.value)


def test_wrong_betas(converted):
  """Churches' betas (beta_end 0.0155) with the Bedrooms config (0.0195), and vice versa."""
  fake, _ = converted
  other = _job_config("churches" if fake.config.model.channels == 3 else "bedrooms")
  state_dict = {**fake.state_dict, "betas": _ldm_betas(other)}
  with pytest.raises(ConversionError, match="betas") as info:
    compvis_ldm.convert_state_dict(state_dict, fake.config)
  message = str(info.value)
  assert f"beta_end={fake.config.diffusion.beta_end}" in message
  assert f"to {other.diffusion.beta_end:.6g}" in message and "\n" not in message


def test_missing_and_unreadable_files(tmp_path):
  config = _job_config("bedrooms")
  with pytest.raises(ConversionError) as info:
    compvis_ldm.convert_ldm_checkpoint(tmp_path / "model.ckpt", config, tmp_path / "out")
  message = str(info.value)
  assert "no such file" in message and "\n" not in message
  assert "https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip" in message
  (tmp_path / "model.ckpt").write_bytes(b"not a checkpoint")
  with pytest.raises(ConversionError, match="torch could not read") as info:
    compvis_ldm.read_state_dict(tmp_path / "model.ckpt")
  assert "\n" not in str(info.value)
  torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
  with pytest.raises(ConversionError, match="has no state_dict"):
    compvis_ldm.read_state_dict(tmp_path / "plain.pt")


def test_lightning_callback_state_loads(tmp_path, monkeypatch):
  """A Lightning 1.x checkpoint keys its callback states by class: they load as stand-ins,
  without pytorch_lightning; any other class is refused (weights_only)."""
  for module_name, class_name in [
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("evil", "Payload"),
  ]:
    cls = type(class_name, (), {"__module__": module_name})
    with monkeypatch.context() as patch:  # The class's module exists while it is saved.
      parts = module_name.split(".")
      for i in range(1, len(parts) + 1):
        patch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
      setattr(sys.modules[module_name], class_name, cls)
      path = tmp_path / f"{class_name}.ckpt"
      torch.save({"state_dict": {"betas": torch.ones(3)}, "callbacks": {cls: {"k": 1}}}, path)
    assert module_name not in sys.modules
    if module_name == "evil":
      with pytest.raises(ConversionError, match=r"pickles objects other than tensors \(evil"):
        compvis_ldm.read_state_dict(path)
    else:
      np.testing.assert_array_equal(compvis_ldm.read_state_dict(path)["betas"], np.ones(3))


def test_incomplete_ema(fakes):
  fake = fakes["bedrooms"]
  ema = [k for k in fake.state_dict if k.startswith("model_ema.diffusion_model")]
  state_dict = {k: v for k, v in fake.state_dict.items() if k != ema[0]}
  with pytest.raises(ConversionError, match="1 UNet tensors without EMA.*--nouse_ema"):
    compvis_ldm.unet_tensors(state_dict)


def test_existing_output_is_kept(converted, tmp_path):
  fake, (teacher_path, _) = converted
  with pytest.raises(ConversionError, match="already exist.*--overwrite"):
    compvis_ldm.convert_ldm_checkpoint(fake.path, fake.config, teacher_path.parent)


def test_cli(fakes, tmp_path):
  """The command prints the two source flags; a call with both --source and --ldm_checkpoint
  is a one-line error."""
  fake = fakes["bedrooms"]
  base = [sys.executable, "-m", "binarydm_jax.convert", f"--ldm_checkpoint={fake.path}"]
  out = tmp_path / "out"
  cmd = base + ["--config=configs/lsun_bedrooms.py:smoke", f"--output={out}"]
  cmd += [f"--config.model.{k}={v}" for k, v in SMALL_MODELS["bedrooms"].items()]
  cmd += ["--config.data.image_size=16"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert f"--config.teacher.source={out / 'teacher'}" in result.stdout
  assert f"--config.first_stage.source={out / 'first_stage'}" in result.stdout
  result = subprocess.run(
    base + ["--source=x", f"--output={out}"], capture_output=True, text=True, timeout=300
  )
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("error: pass exactly one of --source")
