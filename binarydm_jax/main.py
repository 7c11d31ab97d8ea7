"""Command line: `python -m binarydm_jax.main --config=configs/digits.py --workdir=DIR`.

Intentionally short: flags in, `pipeline.run_command(config, workdir)` out. User errors (bad
config, missing data or Inception weights, wrong, damaged or unreachable checkpoint, NaN or
diverging loss, a workdir that is a file or in use by another job) are printed as one line;
anything else is a bug and keeps its traceback. A preempted job (SIGTERM) logs where it saved and exits 0; rerunning it resumes.
"""

from absl import app, flags
from ml_collections import config_flags

from binarydm_jax.errors import one_line_errors
from binarydm_jax.runtime.flag_parsing import parse_flags

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


def main(argv: list[str]) -> None:
  """Runs the job of --config in --workdir."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that `--help` and flag errors stay fast.
  from binarydm_jax.runtime import distributed
  from binarydm_jax.training import pipeline

  with one_line_errors():
    distributed.initialize(
      FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    pipeline.run_command(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
