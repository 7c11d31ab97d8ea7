#!/usr/bin/env bash
# Runs the job on every worker of a TPU VM; jax.distributed connects them (--distributed=auto).
#   bash launch/run_tpu.sh NAME ZONE WORKDIR [extra flags, e.g. --config.teacher.source=/mnt/teachers/ddpm-cifar10-32-flax]
# WORKDIR must be one directory shared by all workers on multi-host slices (e.g. a gcsfuse or
# Filestore mount); gs:// URLs are not supported yet (samples and eval.json use local file I/O).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NAME ZONE WORKDIR [flags...]" >&2
  exit 2
fi
name=$1 zone=$2 workdir=$3
shift 3
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command "
  cd ~/binarydm_jax && . ~/venv/bin/activate &&
  python -m binarydm_jax.main --config=configs/cifar.py --workdir=$workdir \
    --config.model.dtype=bfloat16 --distributed=auto $*
"
