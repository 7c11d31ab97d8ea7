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
from binarydm_jax.sampling import samplers, source_flags
from binarydm_jax.sampling.sampleable import draw

_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_OUT = flags.DEFINE_string("out", None, "PNG grid to write.")
_NPZ = flags.DEFINE_string("npz", None, "Also write the samples (uint8 NHWC, key arr_0) here.")
flags.adopt_module_key_flags(source_flags)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  source_flags.check()
  if not (_OUT.value or _NPZ.value):
    raise app.UsageError("pass --out=grid.png and/or --npz=samples.npz")
  if _NUM.value < 1:
    raise app.UsageError("--num must be positive")
  with one_line_errors():
    source = source_flags.load_source()
    images = draw(
      source,
      _NUM.value,
      source_flags.SAMPLER.value,
      source_flags.STEPS.value,
      source_flags.SEED.value,
      source_flags.BATCH.value,
    )
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
