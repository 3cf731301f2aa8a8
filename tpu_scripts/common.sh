# shellcheck shell=bash
# Sourced by the tpu_scripts (not run on its own): shared defaults, options, and the one place that
# prints (--dry-run) or runs a command. Each script documents the variables it reads in its header.

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-west4-a}"
TPU_NAME="${TPU_NAME:-jpipe}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
REMOTE_DIR="${REMOTE_DIR:-jpipe}"
RUN_NAME="${RUN_NAME:-run}"

DRY_RUN=0
# shellcheck disable=SC2034 # read by the scripts that source this file
EXTRA_ARGS=()

# The calling script's header comment (from line 2 to the first line that is not a comment).
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# -h/--help, -n/--dry-run; everything after `--` goes to EXTRA_ARGS.
parse_options() {
  while (($# > 0)); do
    case "$1" in
      -h | --help)
        usage
        exit 0
        ;;
      -n | --dry-run) DRY_RUN=1 ;;
      --)
        shift
        # shellcheck disable=SC2034 # read by the scripts that source this file
        EXTRA_ARGS=("$@")
        return 0
        ;;
      *)
        echo "error: unknown argument '$1' (see $(basename "$0") --help)" >&2
        exit 2
        ;;
    esac
    shift
  done
}

# Fail with a hint when a required variable is empty.
require() {
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      echo "error: $name is not set; e.g. $name=... $(basename "$0") --dry-run (see --help)" >&2
      exit 2
    fi
  done
}

# Words quoted for a POSIX shell: plain words as they are, others in single quotes.
quote() {
  local word quoted=()
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      quoted+=("$word")
    else
      quoted+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${quoted[*]}"
}

# Print the command (--dry-run), or echo it to stderr and run it.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote "$@")"
  else
    printf '+ %s\n' "$(quote "$@")" >&2
    "$@"
  fi
}

# gcloud compute tpus tpu-vm VERB TPU_NAME --project=PROJECT --zone=ZONE ARGS...
tpu_vm() {
  local verb="$1"
  shift
  run gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" "$@"
}
