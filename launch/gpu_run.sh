#!/usr/bin/env bash
# Runs the job on one multi-GPU machine: one process that uses all its GPUs (or those of --gpus),
# `python -m binarydm_jax.main --config=CONFIG --workdir=WORKDIR FLAGS` from this checkout with the
# `python` on PATH (activate the virtualenv with jax[cuda12] first; see docs/install.md). On SIGTERM
# the job saves a checkpoint and exits 0; running this again resumes.
#
#   launch/gpu_run.sh --workdir=DIR [options] [-- FLAGS...]
#   e.g. launch/gpu_run.sh --workdir=workdirs/cifar-w1a4 --gpus=0,1,2,3
#
# Options:
#   --workdir=DIR        the job's workdir (required)
#   --config=FILE        the config, relative to the checkout (default configs/cifar.py)
#   --gpus=IDS           the GPUs to use, e.g. 0,1 (CUDA_VISIBLE_DEVICES; default: all)
#   --dry-run            print the python command instead of running it
#   --help               this text
#   -- FLAGS...          further flags for binarydm_jax.main, e.g. --config.training.num_steps=1000

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OPTIONS=(workdir config gpus)
FLAG_OPTIONS=()
parse_args "$@"
require workdir
default config configs/cifar.py

cd "$REPO_DIR"
main_command off
if [[ -n ${ARGS[gpus]:-} ]]; then
  [[ ${ARGS[gpus]} =~ ^[0-9]+(,[0-9]+)*$ ]] ||
    die "--gpus=${ARGS[gpus]}: expected GPU ids, e.g. --gpus=0,1"
  MAIN=(env "CUDA_VISIBLE_DEVICES=${ARGS[gpus]}" "${MAIN[@]}")
fi
run "${MAIN[@]}"
