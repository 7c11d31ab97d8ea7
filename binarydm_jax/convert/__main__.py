"""Convert pretrained weights once into orbax checkpoints.

  python -m binarydm_jax.convert --source=DIR_OR_HUB_ID --output=OUT_DIR [--overwrite]
  python -m binarydm_jax.convert --ldm_checkpoint=model.ckpt --config=configs/lsun_bedrooms.py \
      --output=OUT_DIR [--overwrite] [--nouse_ema]

The first converts a diffusers UNet2DModel into OUT_DIR (a teacher checkpoint); the second a
CompVis latent diffusion model.ckpt into OUT_DIR/teacher and OUT_DIR/first_stage.
"""

from absl import app, flags
from ml_collections import config_flags

from binarydm_jax.convert import cli, compvis_ldm
from binarydm_jax.errors import one_line_errors

_SOURCE = flags.DEFINE_string(
  "source",
  None,
  "diffusers UNet2DModel directory (config.json + diffusion_pytorch_model.safetensors), "
  "or a hub id such as google/ddpm-cifar10-32.",
)
_LDM_CHECKPOINT = flags.DEFINE_string(
  "ldm_checkpoint",
  None,
  "A CompVis latent diffusion model.ckpt (UNet + first stage); needs --config.",
)
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "With --ldm_checkpoint: the job config of that model.", lock_config=True
)
_USE_EMA = flags.DEFINE_bool(
  "use_ema", True, "With --ldm_checkpoint: the UNet's EMA weights, when it holds them."
)
_OUTPUT = flags.DEFINE_string(
  "output",
  None,
  "Orbax teacher checkpoint dir to write (--ldm_checkpoint: the dir for teacher/, first_stage/).",
  required=True,
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output (or its parts) if it exists.")


def _ldm() -> str:
  """Converts --ldm_checkpoint; returns the line to print."""
  teacher_path, stage_path = compvis_ldm.convert_ldm_checkpoint(
    _LDM_CHECKPOINT.value,
    _CONFIG.value,
    _OUTPUT.value,
    overwrite=_OVERWRITE.value,
    use_ema=_USE_EMA.value,
  )
  return (
    f"teacher written to {teacher_path}, first stage to {stage_path}; use "
    f"--config.teacher.source={teacher_path} --config.first_stage.source={stage_path}"
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  ldm = _LDM_CHECKPOINT.value is not None
  if (_SOURCE.value is None) != ldm:
    raise SystemExit(
      "error: pass exactly one of --source (a diffusers UNet2DModel) and --ldm_checkpoint "
      "(a CompVis latent diffusion model.ckpt, with --config)"
    )
  if ldm != (_CONFIG.value is not None):
    raise SystemExit(
      "error: --config goes with --ldm_checkpoint (and only with it): the job config of that "
      "model, e.g. configs/lsun_bedrooms.py, configs/ffhq.py or configs/lsun_churches.py"
    )
  with one_line_errors():
    if ldm:
      print(_ldm())
    else:
      path = cli.convert_teacher(_SOURCE.value, _OUTPUT.value, overwrite=_OVERWRITE.value)
      print(f"teacher checkpoint written to {path}; use --config.teacher.source={path}")


if __name__ == "__main__":
  app.run(main)
