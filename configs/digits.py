"""The offline default: scikit-learn's handwritten digits at 16x16, a small UNet, minutes on a laptop.

python -m binarydm_jax.main --config=configs/digits.py --workdir=/tmp/digits
python -m binarydm_jax.main --config=configs/digits.py:smoke --workdir=/tmp/digits_smoke
python -m binarydm_jax.main --config=configs/digits.py:steady --workdir=/tmp/digits_steady

`:steady` scores 16,384 samples instead of 512: two sampling seeds then agree within about 1
digits-FID (BENCHMARKS.md "How steady is the digits-FID"), a tenth of the teacher-student gap,
at 4 s per evaluation on an H200 but about an hour on one CPU core; compare models with it.
"""

import ml_collections

from configs import default

# Samples per evaluation at which two sampling seeds agree within a tenth of the teacher-student
# digits-FID gap (max difference 1.1 over 3 seeds; BENCHMARKS.md).
STEADY_NUM_SAMPLES = 16_384


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg='smoke'` shrinks the same job to a CI-sized run; `'steady'` scores 16,384 samples."""
  if arg not in (None, "", "smoke", "steady"):
    raise ValueError(
      f"configs/digits.py: unknown variant {arg!r}; use 'smoke', 'steady' or nothing"
    )
  config = default.get_config()

  config.data.name = "digits"
  config.data.image_size = 16
  config.data.random_flip = False  # Flipped digits are not digits.

  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.channels = 1
  config.model.dropout = 0.0
  config.model.norm_groups = 8

  config.training.batch_size = 64
  config.training.num_steps = 2000
  config.training.log_every = 100
  config.training.checkpoint_every = 1000
  config.training.sample_every = 2000

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.999
  config.optim.ema_warmup = True

  config.qat.num_steps = 800
  config.qat.batch_size = 64
  config.qat.learning_rate = 2e-4
  config.qat.ema_decay = 0.999
  config.qat.ema_warmup = True

  config.sampling.ddim_steps = 50

  config.eval.metric = "digits_fid"
  config.eval.num_samples = 512
  config.eval.batch_size = 256

  if arg == "steady":
    config.eval.num_samples = STEADY_NUM_SAMPLES
    config.eval.batch_size = 4096
  if arg == "smoke":
    config.model.ch = 16
    config.training.batch_size = 16
    config.training.num_steps = 20
    config.training.log_every = 5
    config.training.checkpoint_every = 10
    config.training.sample_every = 20
    config.optim.warmup_steps = 5
    config.qat.num_steps = 10
    config.qat.batch_size = 16
    config.sampling.ddim_steps = 5
    config.sampling.grid_size = 16
    config.eval.num_samples = 32
    config.eval.batch_size = 32
    config.eval.allow_few_samples = True  # 32 < the 65 of FID and the 359 of KID: unreliable.
  return config
