#!/usr/bin/env bash
# run.sh: run the same `python -m jpipe.train` command on every worker of TPU_NAME at once; the CLI's
# --distributed flag makes each process call jax.distributed.initialize() (on Cloud TPU it finds
# the coordinator and its process id by itself), so the workers form one JAX runtime over the slice.
#
# Usage: PROJECT=my-project tpu_scripts/run.sh [--dry-run] [--help] [-- TRAIN_ARGS...]
#   e.g. tpu_scripts/run.sh -- --preset quickstart --stages 4 --data 4 --schedule zbv --virtual 2 --steps 500
#
# Runs:
#   gcloud compute tpus tpu-vm ssh TPU_NAME --project=PROJECT --zone=ZONE --worker=all --command
#     'set -euo pipefail; cd REMOTE_DIR && mkdir -p runs/RUN_NAME && .venv/bin/python -m jpipe.train
#      --distributed --out runs/RUN_NAME TRAIN_ARGS 2>&1 | tee runs/RUN_NAME/$(hostname).log'
# With DETACH=1 the training runs under nohup (output only in the log) and the command returns at
# once; the run survives a dropped connection. Each worker keeps its own log in
# REMOTE_DIR/runs/RUN_NAME/<hostname>.log; process 0 writes metrics.jsonl, loss.png and the
# schedule chart there too. Pass --resume in TRAIN_ARGS to continue from the newest checkpoint.
#
# Variables (environment; defaults in brackets):
#   PROJECT           Google Cloud project (required)
#   ZONE              the slice's zone [us-west4-a]
#   TPU_NAME          name of the TPU VM / slice [jpipe]
#   REMOTE_DIR        jpipe's folder on each worker (see install.sh) [jpipe]
#   RUN_NAME          the run's folder, REMOTE_DIR/runs/RUN_NAME (do not pass --out) [run]
#   DETACH            1: start in the background and return [0]
#
# Options:
#   -n, --dry-run     print the exact commands instead of running them
#   -h, --help        print this help
#   -- TRAIN_ARGS     the rest goes to `python -m jpipe.train` [--preset quickstart]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DETACH="${DETACH:-0}"

parse_options "$@"
require PROJECT
if ((${#EXTRA_ARGS[@]} == 0)); then
  EXTRA_ARGS=(--preset quickstart)
fi

dir="$(quote "$REMOTE_DIR")"
out="runs/$(quote "$RUN_NAME")"
train=".venv/bin/python -m jpipe.train --distributed --out $out $(quote "${EXTRA_ARGS[@]}")"
log="$out/\$(hostname).log"
command="set -euo pipefail; cd $dir && mkdir -p $out && "
if [[ "$DETACH" == 1 ]]; then
  command+="nohup $train > $log 2>&1 < /dev/null & echo \"started on \$(hostname): $log\""
else
  command+="$train 2>&1 | tee $log"
fi
tpu_vm ssh --worker=all --command "$command"
