"""Importers of pretrained full-precision teachers (diffusers UNet2DModel -> Flax UNet).

`python -m binarydm_jax.convert --source=DIR_OR_HUB_ID --output=OUT_DIR` converts once and writes
an orbax teacher checkpoint; `binarydm_jax.teacher.load_teacher` reads either form.
"""
