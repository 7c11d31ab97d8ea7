#!/usr/bin/env bash
# Copies this checkout to every worker of a TPU VM and installs it there in a virtualenv.
#   bash launch/setup_tpu.sh NAME ZONE
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NAME ZONE" >&2
  exit 2
fi
name=$1 zone=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse "$repo" "$name":~/binarydm_jax --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command "
  set -e
  cd ~/binarydm_jax
  python3 -m venv ~/venv && . ~/venv/bin/activate
  pip install -q 'jax[tpu]==0.10.2'
  pip install -q -r requirements.txt
  pip install -q --no-deps -e .
"
