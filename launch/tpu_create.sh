#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice (step 1 of launch/tpu_*.sh).
#
#   launch/tpu_create.sh --name=NAME --zone=ZONE --accelerator=TYPE [options]
#   e.g. launch/tpu_create.sh --name=binarydm --zone=us-central2-b --accelerator=v4-32
#
# Options:
#   --name=NAME          the TPU VM's name (required)
#   --zone=ZONE          its zone, e.g. us-central2-b (required)
#   --accelerator=TYPE   accelerator type, e.g. v4-8 (one host) or v4-32 (4 hosts) (required)
#   --version=VERSION    TPU software version (default tpu-ubuntu2204-base)
#   --project=PROJECT    Google Cloud project (default: gcloud's configured one)
#   --spot               a Spot VM (cheaper; preempted: the job saves and a rerun resumes)
#   --dry-run            print the gcloud command instead of running it
#   --help               this text

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OPTIONS=(name zone accelerator version project)
FLAG_OPTIONS=(spot)
parse_args "$@"
require name zone accelerator
default version tpu-ubuntu2204-base

tpu_vm create "${ARGS[name]}"
cmd=("${TPU_VM[@]}" "--accelerator-type=${ARGS[accelerator]}" "--version=${ARGS[version]}")
[[ -z ${ARGS[spot]:-} ]] || cmd+=(--spot)
run "${cmd[@]}"
