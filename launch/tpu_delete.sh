#!/usr/bin/env bash
# Deletes a Cloud TPU VM (step 6 of launch/tpu_*.sh). A gs:// workdir stays; a local one on the
# workers is lost with them.
#
#   launch/tpu_delete.sh --name=NAME --zone=ZONE [options]
#
# Options:
#   --name=NAME          the TPU VM's name (required)
#   --zone=ZONE          its zone (required)
#   --project=PROJECT    Google Cloud project (default: gcloud's configured one)
#   --dry-run            print the gcloud command instead of running it
#   --help               this text

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OPTIONS=(name zone project)
FLAG_OPTIONS=()
parse_args "$@"
require name zone

tpu_vm delete "${ARGS[name]}"
run "${TPU_VM[@]}" --quiet
