"""CIFAR-10 32x32, the paper's DDIM setting (DDPM architecture, 35.7M params).

  python -m binarydm_jax.main --config=configs/cifar.py --workdir=/tmp/cifar \
      --config.teacher.source=/path/to/ddpm-cifar10-32

Evaluation needs the converted FID Inception weights in `eval.inception_dir` (checked before
training); `--config.eval.metric=none` skips it.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The defaults are the paper's CIFAR-10 setting, scored as the paper: 50,000 DDIM-100 samples."""
  config = default.get_config()
  config.eval.metric = "inception"  # Weights: see docs/evaluation.md.
  config.eval.num_samples = 50_000
  return config
