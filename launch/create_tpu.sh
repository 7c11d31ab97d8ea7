#!/usr/bin/env bash
# Creates a Cloud TPU VM (or pod slice) for binarydm_jax.
#   bash launch/create_tpu.sh NAME ZONE ACCELERATOR [RUNTIME_VERSION]
#   e.g. bash launch/create_tpu.sh binarydm us-central2-b v4-32
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NAME ZONE ACCELERATOR [RUNTIME_VERSION]" >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3 version=${4:-tpu-ubuntu2204-base}
gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
  --accelerator-type="$accelerator" --version="$version"
