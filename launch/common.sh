# shellcheck shell=bash disable=SC2034 # (the variables are for the scripts that source it)
# Sourced by the launch/*.sh scripts (not run on its own): option parsing, --help, --dry-run, the
# gcloud TPU commands and the binarydm_jax.main command line they share.
#
# A script sets OPTIONS (its "--name" options that take a value) and FLAG_OPTIONS (its "--name"
# switches), then calls parse_args "$@": values land in ARGS[name] (switches as 1), main's extra
# flags after "--" in EXTRA, and --dry-run sets DRY_RUN=1. run prints (--dry-run) or runs a command.

set -euo pipefail

SCRIPT=$(basename "$0")
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$LAUNCH_DIR")
# On every TPU worker, relative to the home directory (where ssh commands start): the checkout,
# its virtualenv and the job's log.
REMOTE_DIR=binarydm_jax
REMOTE_VENV=venv
REMOTE_LOG=binarydm_jax.log
DRY_RUN=0
declare -A ARGS=()
EXTRA=()

die() {
  echo "$SCRIPT: error: $*" >&2
  exit 2
}

# The script's header comment (from line 2 to the first line that is not a comment) on stdout.
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
  exit 0
}

# Parses --name=VALUE / --name VALUE (names in OPTIONS), switches (FLAG_OPTIONS), --dry-run, --help
# and "-- FLAGS..." (into EXTRA).
parse_args() {
  local arg name
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h | --help) usage ;;
      --dry-run) DRY_RUN=1 ;;
      --)
        EXTRA=("$@")
        return
        ;;
      --*)
        name=${arg#--}
        name=${name%%=*}
        if [[ " ${FLAG_OPTIONS[*]} " == *" $name "* && $arg != *=* ]]; then
          ARGS[$name]=1
        elif [[ " ${OPTIONS[*]} " != *" $name "* ]]; then
          die "unknown option $arg (see $SCRIPT --help)"
        elif [[ $arg == *=* ]]; then
          ARGS[$name]=${arg#*=}
        else
          (($#)) || die "option --$name needs a value (see $SCRIPT --help)"
          ARGS[$name]=$1
          shift
        fi
        ;;
      *) die "unexpected argument '$arg' (see $SCRIPT --help)" ;;
    esac
  done
}

# Fails (exit 2) naming the first of the given options that was not passed.
require() {
  local name
  for name in "$@"; do
    [[ -n ${ARGS[$name]:-} ]] || die "missing required argument --$name (see $SCRIPT --help)"
  done
}

# Sets an option's default value unless it was passed.
default() {
  [[ -n ${ARGS[$1]:-} ]] || ARGS[$1]=$2
}

# The arguments as one shell command line (single quotes only where needed, around the value of
# --name=value).
quote() {
  local out=() arg
  local safe='^[A-Za-z0-9_./:=@%+,~-]+$' option='^(--[A-Za-z0-9_.-]+=)(.*)$'
  for arg in "$@"; do
    if [[ $arg =~ $safe ]]; then
      out+=("$arg")
    elif [[ $arg =~ $option ]]; then # --name='value': the value quoted
      out+=("${BASH_REMATCH[1]}'${BASH_REMATCH[2]//\'/\'\\\'\'}'")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Runs the command, or with --dry-run prints it.
run() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    "$@"
  fi
}

# gcloud compute tpus tpu-vm ARGS... in --zone (and --project if given), into TPU_VM.
tpu_vm() {
  TPU_VM=(gcloud compute tpus tpu-vm "$@" "--zone=${ARGS[zone]}")
  [[ -z ${ARGS[project]:-} ]] || TPU_VM+=("--project=${ARGS[project]}")
}

# Runs the shell command $2 over ssh on worker(s) $1 (a number or 'all') of the TPU VM --name.
tpu_ssh() {
  tpu_vm ssh "${ARGS[name]}"
  run "${TPU_VM[@]}" "--worker=$1" "--command=$2"
}

# The job's command line into MAIN: python -m binarydm_jax.main with --config, --workdir,
# --distributed=$1 (off: one process; auto: jax.distributed from the cluster) and EXTRA.
main_command() {
  MAIN=(python -m binarydm_jax.main "--config=${ARGS[config]}" "--workdir=${ARGS[workdir]}")
  MAIN+=("--distributed=$1" "${EXTRA[@]}")
}
