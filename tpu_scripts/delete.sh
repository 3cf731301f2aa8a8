#!/usr/bin/env bash
# delete.sh: delete the TPU VM / slice TPU_NAME (its disks and everything on them go with it:
# fetch.sh first).
#
# Usage: PROJECT=my-project tpu_scripts/delete.sh [--yes] [--dry-run] [--help]
#
# Runs:
#   gcloud compute tpus tpu-vm delete TPU_NAME --project=PROJECT --zone=ZONE [--quiet]
#
# Variables (environment; defaults in brackets):
#   PROJECT           Google Cloud project (required)
#   ZONE              the slice's zone [us-west4-a]
#   TPU_NAME          name of the TPU VM / slice [jpipe]
#
# Options:
#   -y, --yes         do not ask for confirmation (adds --quiet)
#   -n, --dry-run     print the exact commands instead of running them
#   -h, --help        print this help
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

assume_yes=0
options=()
for argument in "$@"; do
  case "$argument" in
    -y | --yes) assume_yes=1 ;;
    *) options+=("$argument") ;;
  esac
done
parse_options "${options[@]+"${options[@]}"}"
require PROJECT
if ((${#EXTRA_ARGS[@]} > 0)); then
  echo "error: delete.sh takes no arguments after --" >&2
  exit 2
fi

if ((assume_yes)); then
  tpu_vm delete --quiet
else
  tpu_vm delete
fi
