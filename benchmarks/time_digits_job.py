"""Wall time of the default offline job, as a user runs it: `python benchmarks/time_digits_job.py`.

Runs `python -m binarydm_jax.main --config=configs/digits.py --workdir=<fresh tmp dir>` in a
subprocess and prints a markdown row with the wall time and the resulting eval.json.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/digits.py", "Config of the timed job.")
flags.DEFINE_string("workdir", None, "Workdir (default: a fresh temporary directory).")


def main(argv: list[str]) -> None:
  del argv
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="digits_job_")
  cmd = [
    sys.executable,
    "-m",
    "binarydm_jax.main",
    f"--config={FLAGS.config}",
    f"--workdir={workdir}",
  ]
  start = time.perf_counter()
  subprocess.run(cmd, cwd=repo, check=True)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, "eval.json")) as f:
    results = json.load(f)
  print(f"| `{' '.join(cmd[1:])}` | {wall / 60:.1f} min | {json.dumps(results, sort_keys=True)} |")


if __name__ == "__main__":
  app.run(main)
