"""What the paper's latent diffusion configs share: the CompVis LDM-4 / LDM-8 models, the paper's
QAT settings for them, and the `:smoke` variant (tiny widths, synthetic images, a random first
stage) that runs the same job in a minute or two on a CPU.
"""

import ml_collections

from configs import default

# The paper's LDM QAT (§1.7): batch 4, about 200K steps, EBB stage 2 from 100K (Table 12);
# lr 2e-5 (bedrooms.yaml's base_learning_rate; the released code scales it to 8e-5 by batch 4).
QAT_STEPS = 200_000
QAT_BATCH = 4
QAT_LR = 2e-5
HEAD_TAIL_BLOCKS = 6  # EBB in the first and last 6 timestep blocks (paper Tables 9-10).
SMOKE_IMAGES = 48  # Synthetic images of the :smoke variant.


def _ldm_common(config: ml_collections.ConfigDict) -> None:
  """The CompVis UNet options, the LDM schedule form and the paper's QAT/evaluation settings."""
  config.model.num_res_blocks = 2
  config.model.dropout = 0.0
  config.model.norm_eps = 1e-5
  config.model.freq_shift = 0.0
  config.model.flip_sin_to_cos = True
  config.model.downsample_padding = "symmetric"

  config.diffusion.beta_schedule = "scaled_linear"  # linspace(sqrt(0.0015), sqrt(end))^2.
  config.diffusion.beta_start = 0.0015

  config.quant.preset = "W1A4"
  config.quant.head_tail_blocks = HEAD_TAIL_BLOCKS
  config.qat.num_steps = QAT_STEPS
  config.qat.batch_size = QAT_BATCH
  config.qat.learning_rate = QAT_LR
  config.qat.switch_step = QAT_STEPS // 2

  config.sampling.ddim_steps = 100
  config.sampling.clip_denoised = False  # Latents are not in [-1, 1].
  config.eval.metric = "inception"
  config.eval.num_samples = 50_000
  config.eval.batch_size = 64


def ldm4(dataset: str, beta_end: float) -> ml_collections.ConfigDict:
  """LDM-4 (bedrooms.yaml / ffhq-ldm-vq-4.yaml): 274.06M-param UNet on 64x64x3 VQ-f4 latents."""
  config = default.get_config()
  config.data.name = dataset
  config.data.image_size = 64  # The UNet's input: 64x64 latents of 256x256 images.
  config.first_stage.kind = "vq"
  config.first_stage.embed_dim = 3
  config.first_stage.z_channels = 3
  config.first_stage.n_embed = 8192
  config.first_stage.ch_mult = (1, 2, 4)
  config.model.channels = 3
  config.model.ch = 224
  config.model.ch_mult = (1, 2, 3, 4)
  config.model.attn_resolutions = (32, 16, 8)  # Downsample factors 2, 4, 8.
  config.model.num_head_channels = 32
  config.diffusion.beta_end = beta_end
  _ldm_common(config)
  return config


def ldm8_churches() -> ml_collections.ConfigDict:
  """LDM-8 (lsun_churches-ldm-kl-8.yaml): 294.97M-param UNet on 32x32x4 KL-f8 latents."""
  config = default.get_config()
  config.data.name = "lsun_churches"
  config.data.image_size = 32  # 32x32 latents of 256x256 images.
  config.first_stage.kind = "kl"
  config.first_stage.embed_dim = 4
  config.first_stage.z_channels = 4
  config.first_stage.n_embed = 0
  config.first_stage.ch_mult = (1, 2, 4, 4)
  config.model.channels = 4
  config.model.ch = 192
  config.model.ch_mult = (1, 2, 2, 4, 4)
  config.model.attn_resolutions = (32, 16, 8, 4)  # Downsample factors 1, 2, 4, 8.
  config.model.num_head_channels = -1
  config.model.num_heads = 8
  config.model.use_scale_shift_norm = True
  config.model.resblock_updown = True
  config.diffusion.beta_end = 0.0155
  _ldm_common(config)
  return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same job shrunk to a CPU minute: synthetic images, tiny UNet and first stage.

  The first stage keeps its kind and depth (so its factor), at width 32 and random weights; the
  UNet keeps its options (heads, scale-shift norm, res-block up/down) at width 32.
  """
  config.data.name = "synthetic"
  config.data.num_images = SMOKE_IMAGES
  config.data.image_size = 8  # Latents of 8 * factor px images.
  config.first_stage.random_init = True
  config.first_stage.ch = 32
  config.first_stage.num_res_blocks = 1
  config.first_stage.n_embed = 64 if config.first_stage.kind == "vq" else 0
  config.first_stage.encode_batch_size = 16
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  if config.model.num_head_channels > 0:
    config.model.num_head_channels = 16
  else:
    config.model.num_heads = 2
  config.training.batch_size = 8
  config.training.num_steps = 8
  config.training.log_every = 4
  config.training.checkpoint_every = 4
  config.training.sample_every = 8
  config.optim.warmup_steps = 2
  config.qat.num_steps = 6
  config.qat.batch_size = 8
  config.qat.switch_step = 3
  config.quant.head_tail_blocks = 1
  config.sampling.ddim_steps = 3
  config.sampling.grid_size = 8
  config.eval.num_samples = 8
  config.eval.batch_size = 8
  config.eval.allow_few_samples = True  # 8 < the 2,049 of FID: unreliable, as a smoke test is.
  return config


def get(base: ml_collections.ConfigDict, arg: str | None, name: str) -> ml_collections.ConfigDict:
  """`base`, or its smoke variant for `arg == 'smoke'`; anything else is an error naming `name`."""
  if arg not in (None, "", "smoke"):
    raise ValueError(f"configs/{name}.py: unknown variant {arg!r}; use 'smoke' or nothing")
  return smoke(base) if arg == "smoke" else base
