"""The real command line, `python -m binarydm_jax.main`, in a subprocess.

The subprocesses see the 8 simulated devices of conftest.py and share this session's persistent
XLA compilation cache with test_train.py (whose job runs the same programs), so only the first of
the two compiles them.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
  return tmp_path_factory.getbasetemp()


def main_env(session_dir):
  """The environment of a `binarydm_jax.main` subprocess: CPU, this session's XLA cache."""
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(session_dir / "jax_compilation_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  return env


def run_main(args, session_dir, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "binarydm_jax.main", *args],
    cwd=ROOT,
    env=main_env(session_dir),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def _check_eval_json(workdir):
  with open(workdir / "eval.json") as f:
    results = json.load(f)
  teacher = results["teacher"]
  assert math.isfinite(teacher["fid"])
  assert teacher["num_samples"] == 32
  assert re.fullmatch(r"digits_cnn_v1_16px_[0-9a-f]{8}", teacher["feature_extractor"])
  assert (workdir / "samples" / "teacher_final.png").exists()
  return results


@pytest.mark.slow
def test_smoke_job_teacher(tmp_path, session_dir):
  """The FP job (teacher + evaluation) of the smoke config, cut to 10 steps."""
  workdir = tmp_path / "smoke"
  args = [
    "--config=configs/digits.py:smoke",
    f"--workdir={workdir}",
    # As test_train.py's job (same programs, so one of the two compiles them).
    "--config.training.num_steps=10",
    "--config.training.checkpoint_every=5",
    "--config.sampling.grid_size=32",
    f"--config.eval.cache_dir={session_dir / 'digits_classifier'}",
  ]
  if "qat" in digits.get_config("smoke"):
    args.append("--config.qat.method=fp")  # the student stage has its own tests
  result = run_main(args, session_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  _check_eval_json(workdir)
  assert sorted(os.listdir(workdir / "teacher")) == ["10", "5"]


@pytest.mark.slow
def test_smoke_job_as_documented(tmp_path, session_dir):
  """The exact command of configs/digits.py's docstring (every stage; minutes on 2 cores)."""
  workdir = tmp_path / "smoke"
  result = run_main(
    ["--config=configs/digits.py:smoke", f"--workdir={workdir}"], session_dir, timeout=900
  )
  assert result.returncode == 0, result.stderr[-3000:]
  results = _check_eval_json(workdir)
  assert results["student"]["bits"] == "W1A4" and results["student"]["ebb"]
  with open(workdir / "efficiency.json") as f:
    accounting = json.load(f)
  assert accounting["params"] > 0 and accounting["saving"]["size"] > 1
  with open(workdir / "export" / "manifest.json") as f:
    manifest = json.load(f)
  on_disk = sum(p.stat().st_size for p in (workdir / "export").rglob("*") if p.is_file())
  assert manifest["export_bytes"] == on_disk and manifest["size_saving"] > 1
  assert manifest["student"]["step"] == 10  # The smoke job's qat.num_steps.


@pytest.mark.parametrize(
  "flag,expected",
  [
    (
      "--config.training.nope=1",
      "error: unknown config field 'nope' in --config.training.nope; "
      "see the config file for the valid fields",
    ),
    ("--config.data.name=mnist", "error: config.data.name='mnist': expected one of"),
    ("--config.qat.switch_step=10", "error: config.qat.switch_step=10: the EBB switch (step 10)"),
    # The student's quantization policy is built before the teacher trains (minutes on digits).
    ("--config.quant.preset=W9A9", "error: config.quant.preset='W9A9': expected one of W1A4"),
    (
      "--config.quant.rules=(('nomatch_layer',),)",
      "error: config.quant.rules[0].regex='nomatch_layer': matches no layer",
    ),
  ],
)
def test_bad_config_is_one_error_line_before_any_work(tmp_path, session_dir, flag, expected):
  result = run_main(
    ["--config=configs/digits.py:smoke", f"--workdir={tmp_path}", flag], session_dir
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr
  (line,) = _error_lines(result.stderr)
  assert line.startswith(expected), line
  assert os.listdir(tmp_path) == []


def test_missing_cifar10_data_dir(tmp_path, session_dir):
  empty = tmp_path / "empty"
  empty.mkdir()
  result = run_main(
    [
      "--config=configs/cifar.py",
      f"--workdir={tmp_path / 'work'}",
      f"--config.data.data_dir={empty}",
      "--config.eval.metric=none",  # Else the missing Inception weights are named too.
    ],
    session_dir,
    timeout=120,  # no network look-ups: a missing dataset fails at once
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr
  (line,) = _error_lines(result.stderr)
  assert line.startswith(f"error: CIFAR-10 is not prepared in {empty}")
  assert f"--config.data.data_dir={empty}" in line
  assert os.listdir(empty) == []  # nothing downloaded or created


def test_missing_data_and_inception_weights_are_named_in_one_error(tmp_path, session_dir):
  """Every missing prerequisite in the first run's one line, not one per try."""
  empty, absent = tmp_path / "empty", tmp_path / "inception"
  empty.mkdir()
  result = run_main(
    [
      "--config=configs/cifar.py",
      f"--workdir={tmp_path / 'work'}",
      f"--config.data.data_dir={empty}",
      f"--config.eval.inception_dir={absent}",
    ],
    session_dir,
    timeout=120,
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr
  (line,) = _error_lines(result.stderr)
  assert line.startswith("error: 2 things this job needs are missing: (1) CIFAR-10 is not prepared")
  assert f"(2) no converted FID Inception weights in {absent}" in line
  assert f"--config.data.data_dir={empty}" in line and f"--out={absent}" in line
  assert not (tmp_path / "work").exists()  # Before the data, the model or any training.
