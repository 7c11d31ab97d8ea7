"""CIFAR-10 32x32, the paper's DDIM setting (DDPM architecture, 35.7M params).

  python -m binarydm_jax.main --config=configs/cifar.py --workdir=/tmp/cifar \
      --config.teacher.source=/path/to/ddpm-cifar10-32
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The defaults are the paper's CIFAR-10 setting."""
  return default.get_config()
