"""Two local processes (jax.distributed + gloo on CPU) train exactly like one process on two devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
  "--config=configs/digits.py:smoke",
  "--config.data.image_size=8",
  "--config.model.ch_mult=(1,2)",
  "--config.model.attn_resolutions=(4,)",
  "--config.training.num_steps=4",
  "--config.training.batch_size=8",
  "--config.training.log_every=2",
  "--config.training.checkpoint_every=4",
  "--config.training.sample_every=4",
  "--config.qat.num_steps=4",
  "--config.qat.batch_size=8",
  "--config.sampling.ddim_steps=2",
  "--config.sampling.grid_size=4",
  "--config.eval.num_samples=4",
  "--config.eval.batch_size=4",
]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(workdir, *extra):
  return [sys.executable, "-m", "binarydm_jax.main", f"--workdir={workdir}", *TINY, *extra]


def _restore(path):
  """A checkpoint's arrays as numpy, whatever devices wrote it."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(os.path.abspath(path)).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(os.path.abspath(path), restore_args=args)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
  single = tmp_path / "single"
  subprocess.run(_command(single), cwd=REPO, env=_env(2), check=True, capture_output=True)

  multi = tmp_path / "multi"
  port = _free_port()
  procs = [
    subprocess.Popen(
      _command(
        multi,
        "--distributed=explicit",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=REPO,
      env=_env(1),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]

  # Checkpoints were written once (by the two processes together) and hold the same values.
  for stage in ("teacher", "student"):
    a = _restore(single / stage / "4" / "state")
    b = _restore(multi / stage / "4" / "state")
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  results = [json.loads((d / "eval.json").read_text()) for d in (single, multi)]
  assert results[0]["student"]["bits"] == results[1]["student"]["bits"] == "W1A4"
  np.testing.assert_allclose(results[0]["teacher"]["fid"], results[1]["teacher"]["fid"], rtol=1e-3)
