"""Command line: `python -m binarydm_jax.main --config=configs/digits.py --workdir=DIR`.

Intentionally short: flags in, `pipeline.run(config, workdir)` out. User errors (`UserError`:
bad config, missing data or Inception weights, wrong or damaged checkpoint, NaN loss, a workdir
that is a file or in use by another job) are printed as one line; a bug keeps its traceback. A preempted job
(SIGTERM) logs where it saved and exits 0; rerunning it resumes.
"""

import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

from binarydm_jax.flag_parsing import parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Path to a config file (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, samples, TensorBoard and eval.json."
)
flags.DEFINE_enum(
  "distributed",
  "off",
  ["off", "auto", "explicit"],
  "Multi-host: 'auto' on Cloud TPU pod slices; 'explicit' with the three flags below.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--distributed=explicit).")
flags.DEFINE_integer("num_processes", None, "Number of processes (--distributed=explicit).")
flags.DEFINE_integer("process_id", None, "This process's index (--distributed=explicit).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of orbax (several lines per checkpoint); warnings still pass."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that `--help` and flag errors stay fast.
  import jax

  from binarydm_jax import distributed, pipeline, workdir_lock
  from binarydm_jax.errors import one_line_errors
  from binarydm_jax.preemption import Preempted

  logging.get_absl_handler().addFilter(_QuietLibraries())
  with one_line_errors():
    distributed.initialize(
      FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
  logging.info(
    "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )
  try:
    with one_line_errors(), workdir_lock.hold(FLAGS.workdir):
      pipeline.run(FLAGS.config, FLAGS.workdir)
  except Preempted as e:  # Nothing evaluated or exported: the rerun continues the stage.
    logging.warning("%s", e)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
