"""`python -m binarydm_jax.convert --source=DIR_OR_HUB_ID --output=OUT_DIR [--overwrite]`."""

from absl import app, flags

from binarydm_jax.convert import cli
from binarydm_jax.errors import TeacherError

_SOURCE = flags.DEFINE_string(
  "source",
  None,
  "diffusers UNet2DModel directory (config.json + diffusion_pytorch_model.safetensors), "
  "or a hub id such as google/ddpm-cifar10-32.",
  required=True,
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Orbax teacher checkpoint dir to write.", required=True
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    path = cli.convert_teacher(_SOURCE.value, _OUTPUT.value, overwrite=_OVERWRITE.value)
  except TeacherError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"teacher checkpoint written to {path}; use --config.teacher.source={path}")


if __name__ == "__main__":
  app.run(main)
