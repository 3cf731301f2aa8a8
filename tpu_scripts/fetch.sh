#!/usr/bin/env bash
# fetch.sh: copy a run's folder (logs, metrics.jsonl, loss.png, checkpoints) from the workers of
# TPU_NAME to this machine, one folder per worker: LOCAL_DIR/worker-<w>/RUN_NAME.
#
# Usage: PROJECT=my-project tpu_scripts/fetch.sh [--dry-run] [--help]
#
# Runs, for each worker w in WORKERS:
#   mkdir -p LOCAL_DIR/worker-w
#   gcloud compute tpus tpu-vm scp --recurse TPU_NAME:REMOTE_DIR/runs/RUN_NAME LOCAL_DIR/worker-w
#     --project=PROJECT --zone=ZONE --worker=w
# Worker 0 runs process 0, which writes the metrics and plots; each worker holds its own log, and,
# on a multi-host slice, the checkpoint files its process wrote: fetch every worker
# (WORKERS="0 1 2 3" on a 4-host slice) for complete checkpoints.
#
# Variables (environment; defaults in brackets):
#   PROJECT           Google Cloud project (required)
#   ZONE              the slice's zone [us-west4-a]
#   TPU_NAME          name of the TPU VM / slice [jpipe]
#   REMOTE_DIR        jpipe's folder on each worker [jpipe]
#   RUN_NAME          the run to fetch (see run.sh) [run]
#   WORKERS           worker indices, space-separated [0]
#   LOCAL_DIR         destination on this machine [tpu_runs/TPU_NAME]
#
# Options:
#   -n, --dry-run     print the exact commands instead of running them
#   -h, --help        print this help
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
WORKERS="${WORKERS:-0}"
LOCAL_DIR="${LOCAL_DIR:-tpu_runs/${TPU_NAME}}"

parse_options "$@"
require PROJECT
if ((${#EXTRA_ARGS[@]} > 0)); then
  echo "error: fetch.sh takes no arguments after --" >&2
  exit 2
fi

read -r -a workers <<< "$WORKERS"
for worker in "${workers[@]}"; do
  if [[ ! "$worker" =~ ^[0-9]+$ ]]; then
    echo "error: WORKERS must hold worker indices (e.g. \"0 1 2 3\"), got '$worker'" >&2
    exit 2
  fi
  run mkdir -p "$LOCAL_DIR/worker-$worker"
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$REMOTE_DIR/runs/$RUN_NAME" "$LOCAL_DIR/worker-$worker" \
    --project="$PROJECT" --zone="$ZONE" --worker="$worker"
done
