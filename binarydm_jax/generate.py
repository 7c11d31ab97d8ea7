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
from binarydm_jax.sampling import source_flags
from binarydm_jax.sampling.sample_shards import generate

_NUM = flags.DEFINE_integer("num_samples", 50000, "Number of samples.")
_OUT = flags.DEFINE_string("out", None, "Directory of the shards (created; resumed if present).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta; default: the config's.")
_SHARD = flags.DEFINE_integer("shard_size", 1000, "Samples per .npz shard.")
flags.adopt_module_key_flags(source_flags)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  source_flags.check()
  if not _OUT.value:
    raise app.UsageError("pass --out=DIR for the shards")
  with one_line_errors():
    source = source_flags.load_source()
    result = generate(
      source,
      _OUT.value,
      _NUM.value,
      seed=source_flags.SEED.value,
      sampler=source_flags.SAMPLER.value,
      steps=source_flags.STEPS.value,
      eta=_ETA.value,
      batch_size=source_flags.BATCH.value,
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
