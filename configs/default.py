"""Base configuration shared by every job; variants (digits.py, cifar.py) override a few fields.

Override any field from the command line, e.g. `--config.training.num_steps=100`.
"""

import ml_collections
from ml_collections import config_dict

from binarydm_jax.data import first_stage
from binarydm_jax.quant import default_quant_config


def get_config() -> ml_collections.ConfigDict:
  """The paper's CIFAR-10 DDPM setting; see configs/cifar.py and configs/digits.py."""
  config = ml_collections.ConfigDict()

  config.data = data = ml_collections.ConfigDict()
  # 'cifar10' (tensorflow-datasets), 'digits' (scikit-learn, offline) or 'folder' (every PNG/JPEG
  # under data.data_dir, center-cropped; model.channels 1 = grayscale, 3 = RGB).
  data.name = "cifar10"
  data.image_size = 32  # Training resolution (images are resized to it if needed).
  data.data_dir = config_dict.placeholder(
    str
  )  # tfds data dir (None = ~/tensorflow_datasets); data.name='folder': the image directory.
  data.random_flip = True  # Random horizontal flips (DDPM uses them on CIFAR-10).
  data.heldout_fraction = 0.2  # digits and folder: fraction held out as the evaluation reference.
  data.seed = 0  # Seed of the data order; the batch of step s depends only on (seed, s).

  config.model = model = ml_collections.ConfigDict()
  model.ch = 128  # Base channel count.
  model.ch_mult = (1, 2, 2, 2)  # Channel multiplier per resolution level.
  model.num_res_blocks = 2  # ResBlocks per level (the decoder has one more per level).
  model.attn_resolutions = (16,)  # Feature-map resolutions that get self-attention.
  model.channels = 3  # Image channels (input and output).
  model.dropout = 0.1  # Dropout inside ResBlocks during training.
  model.num_head_channels = -1  # Channels per attention head; -1 = one head (DDPM).
  model.norm_groups = 32  # GroupNorm groups.
  model.norm_eps = 1e-6  # GroupNorm epsilon (DDPM/diffusers 1e-6; LDM 1e-5).
  model.freq_shift = (
    1.0  # Timestep embedding: exponent denominator is dim/2 - freq_shift (DDPM: 1).
  )
  model.flip_sin_to_cos = False  # Timestep embedding order [cos, sin] (LDM) instead of [sin, cos].
  model.downsample_padding = "asymmetric"  # 'asymmetric' (DDPM/TF SAME) or 'symmetric' (LDM).
  # Optional LDM UNet fields, off when absent (set them in an LDM config; docs/latent_diffusion.md):
  #   model.num_heads: heads per attention layer when num_head_channels is -1 (-1: one head).
  #   model.use_scale_shift_norm: the timestep scales and shifts each ResBlock's second GroupNorm.
  #   model.resblock_updown: 2x down/upsampling by ResBlocks (avg-pool / nearest) instead of convs.
  model.dtype = "float32"  # Compute dtype ('bfloat16' on TPU/GPU); params are always float32.

  # Latent diffusion: the frozen autoencoder around the UNet ('' = pixel space). With one,
  # data.image_size and model.channels are the latents' (docs/latent_diffusion.md).
  config.first_stage = first_stage.default_config()

  config.diffusion = diffusion = ml_collections.ConfigDict()
  # 'linear' (DDPM) or 'scaled_linear' (LDM: linear in sqrt(beta), beta_start 0.0015).
  diffusion.beta_schedule = "linear"
  diffusion.beta_start = 1e-4  # beta_1.
  diffusion.beta_end = 0.02  # beta_T.
  diffusion.num_timesteps = 1000  # T.

  config.teacher = teacher = ml_collections.ConfigDict()
  # A pretrained FP model: a diffusers UNet2DModel directory or an orbax checkpoint written by
  # `python -m binarydm_jax.convert`. None = train the teacher in WORKDIR/teacher.
  teacher.source = config_dict.placeholder(str)

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global batch size (split over devices and hosts).
  training.num_steps = 800_000  # Teacher training steps (DDPM CIFAR-10: 800K).
  training.log_every = 100  # Steps between scalar summaries.
  training.checkpoint_every = 5_000  # Steps between checkpoints.
  training.keep_checkpoints = 3  # Number of most recent checkpoints kept.
  training.sample_every = 50_000  # Steps between sample grids (PNG + TensorBoard).
  training.seed = 0  # Seed of params init, noise and dropout (data order: data.seed).
  # Divergence guard of both stages (the NaN check's sibling): the stage stops, its checkpoints
  # kept, once the loss has been above divergence_factor x its running median (over the last
  # divergence_window losses that were not above) for divergence_steps steps in a row; no periodic
  # checkpoint is written while such a run lasts. Loss / running median (window 100) peaks at 1.5
  # in the digits teacher (batch 64, 600 steps) and, in the digits smoke job (batch 16, the
  # noisiest), at 2.6 (teacher, 600 steps) and 3.7 (student, 400 steps, right after the EBB
  # switch), above 2x for at most 3 steps in a row: 10x for 20 steps leaves a wide margin.
  # 0 (factor or steps) turns it off.
  training.divergence_factor = 10.0
  training.divergence_steps = 20
  training.divergence_window = 100

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-4  # Adam peak learning rate (DDPM: 2e-4).
  optim.warmup_steps = 5_000  # Linear warmup steps (DDPM: 5000).
  optim.grad_clip = 1.0  # Global gradient-norm clip (DDPM: 1.0).
  optim.b1 = 0.9  # Adam beta_1.
  optim.b2 = 0.999  # Adam beta_2.
  optim.ema_decay = 0.9999  # EMA decay of the params used for sampling (DDPM: 0.9999).
  optim.ema_warmup = False  # Decay min(ema_decay, (1+step)/(10+step)): for short runs.

  # Which layers are binarized and how (paper: W1A4, EBB k=2 in head/tail, FP boundary layers).
  config.quant = default_quant_config()

  config.qat = qat = ml_collections.ConfigDict()
  qat.method = "binarydm"  # 'binarydm' (EBB + LRM), 'baseline' (k=1, no LRM) or 'fp' (no student).
  qat.ebb = config_dict.placeholder(bool)  # Evolvable-Basis Binarizer on/off; None = the method's.
  qat.lrm = config_dict.placeholder(bool)  # Low-rank representation mimicking; None = the method's.
  qat.num_steps = 200_000  # QAT steps (paper: ~200K).
  qat.batch_size = 64  # Global QAT batch (paper, CIFAR-10: 64).
  qat.learning_rate = 2e-5  # A tenth of DDPM's 2e-4 (paper: 1/10 to 1/100 of the FP rate).
  qat.warmup_steps = 0  # Linear warmup of the QAT learning rate.
  # Rate of the activation steps, offsets and bias corrections (same schedule, scaled); -1 = the
  # learning_rate above.
  qat.act_learning_rate = -1.0
  # 'constant' (released code; the paper states none) or 'cosine_stage2': constant until the EBB
  # switch (half the steps without EBB), then a cosine to 0 at num_steps.
  qat.lr_schedule = "constant"
  qat.b1 = 0.9  # Adam beta_1.
  qat.b2 = 0.999  # Adam beta_2.
  qat.weight_decay = 0.0  # AdamW decay (released code: 0.01 on everything, scales included).
  qat.grad_clip = 1.0  # Global gradient-norm clip.
  qat.ema_decay = 0.9999  # EMA of the student params used for sampling.
  qat.ema_warmup = False  # Ramp the EMA decay as min(decay, (1+step)/(10+step)).
  qat.ema_restart_at_switch = True  # EBB: restart the EMA from the 1-basis params at the switch.
  qat.switch_step = -1  # EBB stage 2 starts here (higher bases removed); -1 = num_steps // 2.
  qat.ebb_form = (
    "paper"  # 'paper': L_EBB = tau * mean sigma_II in the loss; 'decoupled': shrinkage.
  )
  qat.ebb_tau = 9e-2  # tau of Eq. 9 (paper: 9e-2).
  # sigma_II^i of Eq. 9 from a layer's per-channel sigma_II: 'mean' over channels or 'sum' (C times
  # the per-channel pull; the paper leaves it unspecified).
  qat.ebb_reduction = "mean"
  # Penalise |sigma_II| (minimum at 0) instead of the signed sigma_II of Eq. 9 as printed, which
  # is unbounded below (a strong pull drives sigma_II negative).
  qat.ebb_absolute = False
  # At the switch: 'none' (paper: drop sigma_II) or 'refit': sigma_I re-fit (least squares) to the
  # two-basis kernel and every activation step recalibrated on the calibration batches.
  qat.switch_handover = "none"
  qat.ebb_target_ratio = 0.1  # decoupled form: |sigma_II| <= ratio * initial at the switch.
  qat.lrm_weight = 1e-4  # lambda of Eq. 15 (paper: 1e-4).
  qat.lrm_reduction = 4  # K: keep round(C / K) principal components (paper: 4).
  qat.lrm_axis = "channel"  # 'channel' (paper) or 'width' (released code's NCHW reshape).
  qat.lrm_num_batches = 1  # Teacher batches that fix the PCA projections (paper: the first).
  qat.seed = 0  # Seed of the QAT noise/dropout.

  config.export = export = ml_collections.ConfigDict()
  # Storage of the full-precision params in WORKDIR/export: 'float32' (exact), 'bfloat16' or
  # 'float16' (smaller, lossy). Binarized weights are always sign bits.
  export.fp_dtype = "float32"
  # Storage of the binary scales and activation steps: 'float32' (exact), 'float16' or 'bfloat16'.
  export.quant_dtype = "float32"

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = "ddim"  # 'ddim' or 'ddpm' (ancestral, all T steps).
  sampling.ddim_steps = 100  # DDIM steps (paper: 100).
  sampling.eta = 0.0  # DDIM eta (0 = deterministic).
  sampling.clip_denoised = True  # Clip the predicted x_0 to [-1, 1].
  sampling.variance = "fixedlarge"  # DDPM ancestral variance: 'fixedlarge' or 'fixedsmall'.
  sampling.grid_size = 64  # Images in each saved sample grid.

  config.eval = evaluation = ml_collections.ConfigDict()
  # 'digits_fid' (offline), 'inception' (FID, sFID, IS, precision/recall, KID against the job's
  # own training images, e.g. CIFAR-10's train split for configs/cifar.py; RGB images only; needs
  # the converted weights in eval.inception_dir) or 'none'.
  evaluation.metric = "none"
  evaluation.num_samples = 1000  # Generated samples per evaluated model.
  # Seed of the evaluation's initial noise (the same for every model of a run) and of the digits
  # metrics' bootstrap and KID subsets.
  evaluation.seed = 1234
  evaluation.batch_size = 256  # Global sampling batch (a power of 2, so it splits over 8 devices).
  evaluation.cache_dir = config_dict.placeholder(
    str
  )  # Feature-extractor cache; None = ~/.cache/binarydm_jax.
  # eval.metric='inception': the converted FID Inception weights (python -m
  # binarydm_jax.convert.inception); None = ~/.cache/binarydm_jax/inception_fid.
  evaluation.inception_dir = config_dict.placeholder(str)
  # Score fewer eval samples (or reference images) than a metric needs (FID, sFID: more than the
  # features' dimensions, 64 for digits, 2048 / 2023 for the Inception; KID: its subset size;
  # precision/recall: more than k = 3): False stops the job before training; True scores them and
  # eval.json says "reliable": false and why (`unreliable`). The smoke variants set it.
  evaluation.allow_few_samples = False

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Devices on the data axis; -1 = all devices not used by fsdp.
  mesh.fsdp = 1  # Devices that split params/optimizer state (fsdp); the batch uses both axes.

  return config
