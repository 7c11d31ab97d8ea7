"""Importers of pretrained weights: FP teachers (diffusers UNet2DModel -> Flax UNet), FID Inception.

`python -m binarydm_jax.convert --source=DIR_OR_HUB_ID --output=OUT_DIR` converts once and writes
an orbax teacher checkpoint; `binarydm_jax.convert.teacher.load_teacher` reads either form.
`python -m binarydm_jax.convert.inception --pth=FILE --out=DIR` converts torch-fidelity's FID
Inception for `binarydm_jax.evaluation.inception.load_inception`.
`python -m binarydm_jax.convert --ldm_checkpoint=model.ckpt --config=CONFIG --output=OUT_DIR`
converts a CompVis latent diffusion checkpoint (`compvis_ldm`, `compvis_unet`) into OUT_DIR/teacher
and OUT_DIR/first_stage.
`diffusers_autoencoder` converts the LDM first-stage autoencoders (diffusers VQModel/AutoencoderKL,
CompVis latent-diffusion checkpoints) to `binarydm_jax.models.autoencoder` params.
"""
