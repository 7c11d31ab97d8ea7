#!/usr/bin/env bash
# Installs the code on every worker of a TPU VM (step 3 of launch/tpu_*.sh, after tpu_copy.sh): a
# virtualenv ~/venv with jax[tpu] at the version pinned in requirements.txt, the pinned
# requirements.txt and the package (editable).
#
#   launch/tpu_setup.sh --name=NAME --zone=ZONE [options]
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

jax_version=$(sed -n 's/^jax==\([^ #]*\).*/\1/p' "$REPO_DIR/requirements.txt")
[[ -n $jax_version ]] || die "no 'jax==VERSION' pin in $REPO_DIR/requirements.txt"
setup=(
  "set -e"
  "cd $REMOTE_DIR"
  "python3 -m venv ~/$REMOTE_VENV"
  ". ~/$REMOTE_VENV/bin/activate"
  "pip install --quiet 'jax[tpu]==$jax_version' -r requirements.txt"
  "pip install --quiet --no-deps -e ."
)
printf -v command '%s; ' "${setup[@]}"
tpu_ssh all "${command%; }"
