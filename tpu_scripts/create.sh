#!/usr/bin/env bash
# create.sh: create the Cloud TPU VM or pod slice TPU_NAME (waits until it is ready).
#
# Usage: PROJECT=my-project tpu_scripts/create.sh [--dry-run] [--help]
#
# Runs:
#   gcloud compute tpus tpu-vm create TPU_NAME --project=PROJECT --zone=ZONE
#     --accelerator-type=ACCELERATOR_TYPE --version=RUNTIME_VERSION [--spot]
#
# Variables (environment; defaults in brackets):
#   PROJECT           Google Cloud project (required)
#   ZONE              a zone with ACCELERATOR_TYPE capacity and quota [us-west4-a]
#   TPU_NAME          name of the TPU VM / slice [jpipe]
#   ACCELERATOR_TYPE  v5litepod-8 (1 host x 8 chips), v5litepod-16 (4 hosts x 4), v4-32, v6e-16, ...
#                     [v5litepod-16]
#   RUNTIME_VERSION   TPU software image for that generation: v2-alpha-tpuv5-lite (v5e),
#                     v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4)
#                     [v2-alpha-tpuv5-lite]
#   SPOT              1 to create a Spot slice (cheaper, can be preempted) [0]
#
# Options:
#   -n, --dry-run     print the exact commands instead of running them
#   -h, --help        print this help
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SPOT="${SPOT:-0}"

parse_options "$@"
require PROJECT
if ((${#EXTRA_ARGS[@]} > 0)); then
  echo "error: create.sh takes no arguments after --" >&2
  exit 2
fi

flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [[ "$SPOT" == 1 ]]; then
  flags+=(--spot)
fi
tpu_vm create "${flags[@]}"
