"""Draws many samples in resumable `.npz` shards, over all devices (and hosts).

  python -m binarydm_jax.generate --workdir=DIR --which=teacher|student --num_samples=50000 \
      --out=DIR/samples [--sampler=ddim --steps=100 --eta=0] [--shard_size=1000 --batch_size=256]
  python -m binarydm_jax.generate --export=DIR/export --num_samples=50000 --out=DIR/samples

See `binarydm_jax.sampling.sample_shards` for the shard layout, resuming and `load_samples`.
"""

from __future__ import annotations

import jax
from absl import app, flags

from binarydm_jax.errors import one_line_errors
from binarydm_jax.sampling.sample_shards import generate
from binarydm_jax.sampling.sampleable import load

_EXPORT = flags.DEFINE_string(
  "export", None, "An export directory (python -m binarydm_jax.export)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "A job's --workdir, sampled with --which.")
_WHICH = flags.DEFINE_enum("which", "student", ["teacher", "student"], "Model of --workdir.")
_INFERENCE = flags.DEFINE_enum(
  "inference", "float", ["float", "int8"], "--export: fake-quant float or the int8 path."
)
_NUM = flags.DEFINE_integer("num_samples", 50000, "Number of samples.")
_OUT = flags.DEFINE_string("out", None, "Directory of the shards (created; resumed if present).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "ddpm"], "Default: the model's config.")
_STEPS = flags.DEFINE_integer("steps", None, "DDIM steps; default: the config's ddim_steps.")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta; default: the config's.")
_SEED = flags.DEFINE_integer("seed", 0, "Sample i is drawn from fold_in(key(seed), i).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Samples per compiled call (all devices).")
_SHARD = flags.DEFINE_integer("shard_size", 1000, "Samples per .npz shard.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if bool(_EXPORT.value) == bool(_WORKDIR.value):
    raise app.UsageError("pass exactly one of --export=DIR or --workdir=DIR")
  if not _OUT.value:
    raise app.UsageError("pass --out=DIR for the shards")
  if _STEPS.value is not None and _STEPS.value < 1:
    raise app.UsageError("--steps must be positive")
  with one_line_errors():
    source = load(_EXPORT.value, _WORKDIR.value, _WHICH.value, _INFERENCE.value)
    result = generate(
      source,
      _OUT.value,
      _NUM.value,
      seed=_SEED.value,
      sampler=_SAMPLER.value,
      steps=_STEPS.value,
      eta=_ETA.value,
      batch_size=_BATCH.value,
      shard_size=_SHARD.value,
      log=lambda line: print(line, flush=True),
    )
  if jax.process_index() == 0:
    print(
      f"{result['num_samples']} samples of the {source.name} in {_OUT.value} "
      f"({result['drawn']} shard(s) drawn now)"
    )


if __name__ == "__main__":
  app.run(main)
