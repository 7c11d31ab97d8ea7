"""LDM-4 on LSUN-Bedrooms 256x256: the paper's headline model (Table 2, Table 5).

  python -m binarydm_jax.main --config=configs/lsun_bedrooms.py --workdir=DIR \
      --config.teacher.source=CONVERTED/teacher --config.first_stage.source=CONVERTED/first_stage
  python -m binarydm_jax.main --config=configs/lsun_bedrooms.py:smoke --workdir=/tmp/ldm_smoke
  python -m binarydm_jax.efficiency --config=configs/lsun_bedrooms.py

docs/latent_diffusion.md ("From the published checkpoint to a 1-bit export") says how to get
CONVERTED from the published model.ckpt.
"""

import ml_collections

from configs import ldm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """bedrooms.yaml: VQ-f4 first stage, 274.06M-param UNet, beta_end 0.0195; `arg='smoke'`: tiny."""
  return ldm.get(ldm.ldm4("lsun_bedrooms", beta_end=0.0195), arg, "lsun_bedrooms")
