#!/usr/bin/env bash
# Starts the job on every worker of a TPU VM (step 4 of launch/tpu_*.sh): the same
# `python -m binarydm_jax.main --config=CONFIG --workdir=WORKDIR --distributed=auto FLAGS` on all
# workers at once (one gcloud ssh --worker=all), in the background with its output in
# ~/binarydm_jax.log on each worker (watch it with launch/tpu_logs.sh). jax.distributed connects
# the workers; on preemption the job saves a checkpoint and exits 0, and running this again resumes.
#
#   launch/tpu_run.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/DIR [options] [-- FLAGS...]
#   e.g. launch/tpu_run.sh --name=binarydm --zone=us-central2-b --workdir=gs://my-bucket/w1a4 \
#          -- --config.model.dtype=bfloat16
#
# Options:
#   --name=NAME          the TPU VM's name (required)
#   --zone=ZONE          its zone (required)
#   --workdir=DIR        the job's workdir, one for all workers: a GCS path (gs://BUCKET/DIR) or a
#                        directory that every worker mounts at the same path (required)
#   --config=FILE        the config, relative to the checkout (default configs/cifar.py)
#   --project=PROJECT    Google Cloud project (default: gcloud's configured one)
#   --dry-run            print the gcloud command (with the python command in it) instead
#   --help               this text
#   -- FLAGS...          further flags for binarydm_jax.main, e.g. --config.training.num_steps=1000

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OPTIONS=(name zone workdir config project)
FLAG_OPTIONS=()
parse_args "$@"
require name zone workdir
default config configs/cifar.py

main_command auto
tpu_ssh all "cd $REMOTE_DIR && . ~/$REMOTE_VENV/bin/activate && \
nohup $(quote "${MAIN[@]}") > ~/$REMOTE_LOG 2>&1 < /dev/null &"
