#!/usr/bin/env bash
# Puts the code on every worker of a TPU VM, in ~/binarydm_jax (step 2 of launch/tpu_*.sh): this
# checkout as it is on disk (without .git, .venv and workdirs), or with --repo a git clone.
#
#   launch/tpu_copy.sh --name=NAME --zone=ZONE [--repo=URL [--ref=BRANCH_OR_TAG]] [options]
#
# Options:
#   --name=NAME          the TPU VM's name (required)
#   --zone=ZONE          its zone (required)
#   --repo=URL           clone this git repository on every worker instead of copying this checkout
#   --ref=REF            the branch or tag to clone (default: the repository's default branch)
#   --project=PROJECT    Google Cloud project (default: gcloud's configured one)
#   --dry-run            print the tar / gcloud commands instead of running them
#   --help               this text

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OPTIONS=(name zone repo ref project)
FLAG_OPTIONS=()
parse_args "$@"
require name zone

if [[ -n ${ARGS[repo]:-} ]]; then
  clone=(git clone --depth=1)
  [[ -z ${ARGS[ref]:-} ]] || clone+=("--branch=${ARGS[ref]}")
  clone+=("${ARGS[repo]}" "$REMOTE_DIR")
  tpu_ssh all "rm -rf $REMOTE_DIR && $(quote "${clone[@]}")"
  exit 0
fi
[[ -z ${ARGS[ref]:-} ]] || die "--ref needs --repo (without --repo this checkout is copied)"
archive=${TMPDIR:-/tmp}/binarydm_jax-$$.tar.gz
run tar -czf "$archive" --exclude=.git --exclude=.venv --exclude=workdirs --exclude=__pycache__ \
  -C "$REPO_DIR" .
tpu_vm scp "$archive" "${ARGS[name]}:$REMOTE_DIR.tar.gz"
run "${TPU_VM[@]}" --worker=all
run rm -f "$archive"
tpu_ssh all "rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
