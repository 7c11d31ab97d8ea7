"""LDM-4 on LSUN-Bedrooms 256x256: the paper's headline UNet (274.06M params) on 64x64x3 VQ-f4 latents.

For efficiency accounting only (the UNet, the quantization policy and the latent size); the data
pipeline has no LSUN latents, so a training job with this config stops at config validation.

  python -m binarydm_jax.efficiency --config=configs/ldm4_bedrooms.py
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The released code's bedrooms.yaml UNet, W1A4 BinaryDM policy."""
  config = default.get_config()

  config.data.name = "lsun_bedrooms_latents"  # Not loadable: only data.image_size is used.
  config.data.image_size = 64  # The 64x64x3 latent of a 256x256 image (VQ-f4).

  config.model.ch = 224
  config.model.ch_mult = (1, 2, 3, 4)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (32, 16, 8)  # Latent resolutions (bedrooms.yaml: 8, 4, 2 ds).
  config.model.channels = 3
  config.model.dropout = 0.0
  config.model.num_head_channels = 32
  config.model.norm_eps = 1e-5
  config.model.freq_shift = 0.0
  config.model.flip_sin_to_cos = True
  config.model.downsample_padding = "symmetric"

  config.quant.preset = "W1A4"
  return config
