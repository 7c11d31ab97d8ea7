#!/usr/bin/env bash
# The job on several GPU hosts with SLURM: one process per GPU, started by srun; jax.distributed
# connects them from SLURM's environment (--distributed=auto: jax.distributed.initialize() reads
# SLURM_JOB_ID, SLURM_STEP_NODELIST (process 0's host is the coordinator), SLURM_NTASKS,
# SLURM_PROCID and SLURM_LOCALID (the GPU of each process)). Run it from the checkout's root with
# its virtualenv active (jax[cuda12]); the job inherits that environment.
#
# Outside an allocation it submits itself (sbatch, with --nodes and --gpus-per-node); inside one
# (sbatch'ed directly, or under salloc) it runs srun. SLURM sends SIGTERM 5 minutes before the time
# limit (--signal=TERM@300) and on preemption: the job saves a checkpoint and exits 0; submitting
# the same command again resumes.
#
#   launch/gpu_slurm.sh --nodes=N --workdir=DIR [options] [-- FLAGS...]
#   sbatch --nodes=N [sbatch options] launch/gpu_slurm.sh --workdir=DIR [-- FLAGS...]
#   e.g. launch/gpu_slurm.sh --nodes=2 --gpus-per-node=8 --workdir=/shared/w1a4 --time=24:00:00
#
# Options:
#   --nodes=N            number of hosts (required when submitting; inside a job: the job's)
#   --gpus-per-node=G    GPUs per host, one process each (default 8; inside a job: the job's)
#   --workdir=DIR        the job's workdir, on a filesystem shared by all hosts (required)
#   --config=FILE        the config, relative to the checkout (default configs/cifar.py)
#   --partition=NAME     SLURM partition (default: the cluster's)
#   --time=LIMIT         SLURM time limit, e.g. 24:00:00 (default: the partition's)
#   --dry-run            print the sbatch and srun commands instead of running them
#   --help               this text
#   -- FLAGS...          further flags for binarydm_jax.main, e.g. --config.training.num_steps=1000

#SBATCH --job-name=binarydm
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --signal=TERM@300
#SBATCH --output=slurm-%j.out

# In a job SLURM runs a copy of this file from its spool directory; the checkout is the working
# directory (sbatch --chdir, or where sbatch was run).
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  here=$PWD/launch
else
  here=$(dirname "${BASH_SOURCE[0]}")
fi
# shellcheck source=common.sh
source "$here/common.sh"

OPTIONS=(nodes gpus-per-node workdir config partition time)
FLAG_OPTIONS=()
parse_args "$@"
require workdir
default config configs/cifar.py

# The job's step: N hosts, G processes (one GPU each) per host.
job_step() {
  local nodes=$1 gpus=$2
  main_command auto
  run srun "--nodes=$nodes" "--ntasks=$((nodes * gpus))" "--ntasks-per-node=$gpus" \
    "--gpus-per-node=$gpus" --kill-on-bad-exit=1 "${MAIN[@]}"
}

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  tasks=${SLURM_NTASKS_PER_NODE:-}
  [[ -n $tasks ]] ||
    die "no SLURM_NTASKS_PER_NODE in this job: submit it with --ntasks-per-node=GPUS"
  job_step "$SLURM_JOB_NUM_NODES" "${tasks%%(*}"
  exit 0
fi

require nodes
default gpus-per-node 8
for count in nodes gpus-per-node; do
  [[ ${ARGS[$count]} =~ ^[1-9][0-9]*$ ]] ||
    die "--$count=${ARGS[$count]}: expected a positive number"
done
submit=(sbatch "--nodes=${ARGS[nodes]}" "--ntasks-per-node=${ARGS[gpus-per-node]}"
  "--gpus-per-node=${ARGS[gpus-per-node]}" "--chdir=$REPO_DIR")
[[ -z ${ARGS[partition]:-} ]] || submit+=("--partition=${ARGS[partition]}")
[[ -z ${ARGS[time]:-} ]] || submit+=("--time=${ARGS[time]}")
# The script gets the options it needs in the job; the counts come from the allocation.
job_args=("--workdir=${ARGS[workdir]}" "--config=${ARGS[config]}")
((${#EXTRA[@]} == 0)) || job_args+=(-- "${EXTRA[@]}")
run "${submit[@]}" "$LAUNCH_DIR/gpu_slurm.sh" "${job_args[@]}"
if ((DRY_RUN)); then
  echo "# in the job, on ${ARGS[nodes]} hosts:"
  job_step "${ARGS[nodes]}" "${ARGS[gpus-per-node]}"
fi
