"""Every command line: `--help` lists its own flags, and it starts without TensorFlow or its logs.

TensorFlow is imported only where it is used (tfds data, clu's TensorBoard writer) through
`binarydm_jax.runtime.lazy_imports`; its C++ start-up logs are silenced by the package itself.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "binarydm_jax"
# Command -> one flag of its own (not absl's).
COMMANDS = {
  "binarydm_jax.main": "--workdir",
  "binarydm_jax.sample": "--which",
  "binarydm_jax.generate": "--num_samples",
  "binarydm_jax.evaluate": "--samples",
  "binarydm_jax.export": "--quant_dtype",
  "binarydm_jax.efficiency": "--fp_dtype",
  "binarydm_jax.convert": "--ldm_checkpoint",
  "binarydm_jax.convert.inception": "--pth",
  "binarydm_jax.fidelity": "--sqnr_groups",
}
# TensorFlow's start-up lines (C++ logging), which the package silences.
TF_START_UP_LOGS = ("oneDNN custom operations", "absl::InitializeLog()", "cpu_feature_guard")


def _env(**updates):
  """This environment on CPU, without the TF log level that conftest.py sets for the tests."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env.update(JAX_PLATFORMS="cpu", **updates)
  return env


def _run(args, timeout=120):
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
  )


def _imported(importtime_stderr):
  """The modules `python -X importtime` reports as imported."""
  return {
    line.rsplit("|", 1)[1].strip()
    for line in importtime_stderr.splitlines()
    if line.startswith("import time:") and line.count("|") == 2
  }


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_the_commands_own_flags_without_importing_tensorflow(command):
  result = _run(["-X", "importtime", "-m", command, "--help"])
  assert "Traceback" not in result.stderr, result.stderr[-2000:]  # absl's --help exits 1.
  assert f"  {COMMANDS[command]}" in result.stdout, result.stdout
  imported = _imported(result.stderr)
  assert "absl.flags" in imported  # The import report is there to be read.
  assert not {"tensorflow", "tensorflow_datasets", "clu.metric_writers"} & imported


def test_evaluate_help_is_the_scoring_cli_not_the_job_evaluator():
  result = _run(["-m", "binarydm_jax.evaluate", "--help"])
  assert "scores generated samples" in result.stdout
  assert "Evaluates trained models" not in result.stdout
  for flag in ("--samples", "--ref", "--json", "--inception"):
    assert f"  {flag}:" in result.stdout, flag
  assert not any(line in result.stdout + result.stderr for line in TF_START_UP_LOGS)


# The modules that define their flags when imported (so no two of them import in one process).
FLAG_MODULES = {
  "binarydm_jax.main",
  "binarydm_jax.sample",
  "binarydm_jax.generate",
  "binarydm_jax.evaluate",
  "binarydm_jax.convert.__main__",
  "binarydm_jax.export.__main__",
  "binarydm_jax.fidelity",
}


def _library_modules():
  """Every module of the package but those of FLAG_MODULES."""
  names = []
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    if name not in FLAG_MODULES:
      names.append(name)
  return names


def test_importing_the_package_does_not_import_tensorflow():
  modules = _library_modules()
  assert "binarydm_jax.training.pipeline" in modules and "binarydm_jax.main" not in modules
  script = (
    f"import importlib, sys\nfor name in {modules!r}:\n  importlib.import_module(name)\n"
    "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'clu.metric_writers') "
    "if m in sys.modules))"
  )
  result = _run(["-c", script], timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]"


def test_tensorflow_starts_quietly_where_it_is_used(tmp_path):
  """clu's writer and a tfds builder import TensorFlow; its start-up logs stay silent."""
  script = (
    "from binarydm_jax.runtime import lazy_imports\n"
    f"writer = lazy_imports.metric_writers().create_default_writer({str(tmp_path)!r})\n"
    "writer.write_scalars(0, {'loss': 1.0})\n"
    "writer.flush()\n"
    f"print(lazy_imports.tfds().builder('cifar10', data_dir={str(tmp_path)!r}).is_prepared())\n"
  )
  result = _run(["-c", script])
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "False"
  assert list(tmp_path.glob("events.out.tfevents.*"))  # TensorFlow did run.
  for line in TF_START_UP_LOGS:
    assert line not in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["binarydm_jax.sample", "binarydm_jax.generate"])
def test_sample_and_generate_share_the_source_flags(command):
  help_text = _run(["-m", command, "--help"]).stdout
  for flag in ("--export", "--workdir", "--which", "--inference", "--sampler", "--steps", "--seed"):
    assert f"  {flag}:" in help_text, flag
  both = _run(["-m", command, "--export=a", "--workdir=b", "--out=c"])
  assert "pass exactly one of --export=DIR or --workdir=DIR" in both.stderr
  assert both.returncode != 0
