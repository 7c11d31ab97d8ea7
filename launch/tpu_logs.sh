#!/usr/bin/env bash
# Streams the job's log of one TPU worker (step 5 of launch/tpu_*.sh; Ctrl-C stops watching, not
# the job). Worker 0 writes the TensorBoard events and the evaluation; all workers log their steps.
#
#   launch/tpu_logs.sh --name=NAME --zone=ZONE [--worker=N] [options]
#
# Options:
#   --name=NAME          the TPU VM's name (required)
#   --zone=ZONE          its zone (required)
#   --worker=N           which worker's log (default 0)
#   --project=PROJECT    Google Cloud project (default: gcloud's configured one)
#   --dry-run            print the gcloud command instead of running it
#   --help               this text

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OPTIONS=(name zone worker project)
FLAG_OPTIONS=()
parse_args "$@"
require name zone
default worker 0
[[ ${ARGS[worker]} =~ ^[0-9]+$ ]] ||
  die "--worker=${ARGS[worker]}: expected a worker number, e.g. --worker=0"

tpu_ssh "${ARGS[worker]}" "tail -n +1 -F ~/$REMOTE_LOG"
