"""LDM-4 on FFHQ 256x256 (paper Table 2): the bedrooms architecture on face images.

  python -m binarydm_jax.main --config=configs/ffhq.py --workdir=DIR \
      --config.data.data_dir=FFHQ_IMAGES --config.teacher.source=CONVERTED/teacher \
      --config.first_stage.source=CONVERTED/first_stage
  python -m binarydm_jax.main --config=configs/ffhq.py:smoke --workdir=/tmp/ffhq_smoke

tensorflow-datasets has no FFHQ: the images come from a folder (data.name='folder').
"""

import ml_collections

from configs import ldm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ffhq-ldm-vq-4.yaml: VQ-f4, 274.06M-param UNet, beta_end 0.0195, no flips; `arg='smoke'`."""
  config = ldm.ldm4("folder", beta_end=0.0195)
  config.data.random_flip = False  # The LDM's FFHQ loader (taming) does not flip.
  return ldm.get(config, arg, "ffhq")
