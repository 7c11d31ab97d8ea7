"""The flags `sample` and `generate` share: the model to sample (an export or a workdir's) and how.

Importing this module defines them; each command adopts them as its own key flags, so that its
`--help` lists them.
"""

from __future__ import annotations

from absl import app, flags

from binarydm_jax.sampling.sampleable import Sampleable, load

EXPORT = flags.DEFINE_string("export", None, "An export directory (python -m binarydm_jax.export).")
WORKDIR = flags.DEFINE_string("workdir", None, "A job's --workdir, sampled with --which.")
WHICH = flags.DEFINE_enum("which", "student", ["teacher", "student"], "Model of --workdir.")
INFERENCE = flags.DEFINE_enum(
  "inference", "float", ["float", "int8"], "--export: fake-quant float or the int8 path."
)
SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "ddpm"], "Default: the model's config.")
STEPS = flags.DEFINE_integer("steps", None, "DDIM steps; default: the config's ddim_steps.")
SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the initial noise (and of DDPM's noise).")
BATCH = flags.DEFINE_integer("batch_size", 256, "Samples per compiled call (all devices).")


def check() -> None:
  """Raises `app.UsageError` unless exactly one source is given and the counts are positive."""
  if bool(EXPORT.value) == bool(WORKDIR.value):
    raise app.UsageError("pass exactly one of --export=DIR or --workdir=DIR")
  if BATCH.value < 1 or (STEPS.value is not None and STEPS.value < 1):
    raise app.UsageError("--batch_size and --steps must be positive")


def load_source() -> Sampleable:
  """The model the flags name (an export in --inference mode, or --which model of --workdir)."""
  return load(EXPORT.value, WORKDIR.value, WHICH.value, INFERENCE.value)
