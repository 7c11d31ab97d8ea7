"""Samples an exported student or a job's checkpoint; writes a PNG grid and optionally an npz.

  python -m binarydm_jax.sample --export=DIR/export --num=64 --sampler=ddim --steps=50 --seed=0 \
      --out=grid.png [--npz=samples.npz]
  python -m binarydm_jax.sample --workdir=DIR --which=teacher|student --out=grid.png

The grid's images are enlarged (nearest) to at least 64 px; the npz holds `arr_0`, the samples
as uint8 NHWC. Sampler settings default to the model's own config (its `sampling` section).
"""

from __future__ import annotations

from absl import app, flags
from etils import epath

from binarydm_jax.errors import one_line_errors
from binarydm_jax.runtime import fileio
from binarydm_jax.sampling import samplers
from binarydm_jax.sampling.sampleable import draw, load

_EXPORT = flags.DEFINE_string(
  "export", None, "An export directory (python -m binarydm_jax.export)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "A job's --workdir, sampled with --which.")
_WHICH = flags.DEFINE_enum("which", "student", ["teacher", "student"], "Model of --workdir.")
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "ddpm"], "Default: the model's config.")
_STEPS = flags.DEFINE_integer("steps", None, "DDIM steps; default: the config's ddim_steps.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the initial noise (and DDPM's noise).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Samples drawn per compiled call.")
_OUT = flags.DEFINE_string("out", None, "PNG grid to write.")
_INFERENCE = flags.DEFINE_enum(
  "inference", "float", ["float", "int8"], "--export: fake-quant float or the int8 path."
)
_NPZ = flags.DEFINE_string("npz", None, "Also write the samples (uint8 NHWC, key arr_0) here.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if bool(_EXPORT.value) == bool(_WORKDIR.value):
    raise app.UsageError("pass exactly one of --export=DIR or --workdir=DIR")
  if not (_OUT.value or _NPZ.value):
    raise app.UsageError("pass --out=grid.png and/or --npz=samples.npz")
  if _NUM.value < 1 or _BATCH.value < 1 or (_STEPS.value is not None and _STEPS.value < 1):
    raise app.UsageError("--num, --batch_size and --steps must be positive")
  with one_line_errors():
    source = load(_EXPORT.value, _WORKDIR.value, _WHICH.value, _INFERENCE.value)
    images = draw(source, _NUM.value, _SAMPLER.value, _STEPS.value, _SEED.value, _BATCH.value)
  written = []
  if _OUT.value:
    samplers.save_png(samplers.image_grid(images), _OUT.value)
    written.append(_OUT.value)
  if _NPZ.value:
    npz = epath.Path(_NPZ.value)
    npz.parent.mkdir(parents=True, exist_ok=True)
    npz.write_bytes(fileio.npz_bytes(arr_0=samplers.to_uint8(images)))
    written.append(_NPZ.value)
  print(f"{len(images)} samples of the {source.name}: {', '.join(written)}")


if __name__ == "__main__":
  app.run(main)
