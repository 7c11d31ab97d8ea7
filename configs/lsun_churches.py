"""LDM-8 on LSUN-Churches 256x256 (paper Table 2): KL-f8 latents, the 295M-param UNet.

  python -m binarydm_jax.main --config=configs/lsun_churches.py --workdir=DIR \
      --config.teacher.source=CONVERTED/teacher --config.first_stage.source=CONVERTED/first_stage
  python -m binarydm_jax.main --config=configs/lsun_churches.py:smoke --workdir=/tmp/church_smoke
"""

import ml_collections

from configs import ldm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """lsun_churches-ldm-kl-8.yaml: KL-f8, scale-shift norm, res-block up/down; `arg='smoke'`."""
  return ldm.get(ldm.ldm8_churches(), arg, "lsun_churches")
