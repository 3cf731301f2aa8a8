#!/usr/bin/env bash
# install.sh: put jpipe on every worker of TPU_NAME, in REMOTE_DIR with a Python PYTHON_VERSION
# virtual environment (.venv) holding jpipe (editable) and jax[tpu]. Safe to run again (updates).
#
# Usage: PROJECT=my-project tpu_scripts/install.sh [--dry-run] [--help]
#
# Runs, when REPO_URL is empty (the default: ship this checkout's committed HEAD):
#   git -C REPO_ROOT archive --format=tar.gz -o ARCHIVE HEAD
#   gcloud compute tpus tpu-vm scp ARCHIVE TPU_NAME:jpipe-src.tar.gz --project=PROJECT --zone=ZONE --worker=all
#   gcloud compute tpus tpu-vm ssh TPU_NAME --project=PROJECT --zone=ZONE --worker=all --command 'SETUP'
# or, with REPO_URL set, only the ssh, whose SETUP clones REPO_URL at REPO_REF (or updates the clone).
# SETUP unpacks or checks out the source, installs uv (https://astral.sh/uv) if missing, creates
# REMOTE_DIR/.venv with Python PYTHON_VERSION (TPU images ship Python 3.10; JAX needs >= 3.11),
# runs `uv pip install -e . JAX_PACKAGE`, and prints the installed jax and jpipe versions.
#
# Variables (environment; defaults in brackets):
#   PROJECT           Google Cloud project (required)
#   ZONE              the slice's zone [us-west4-a]
#   TPU_NAME          name of the TPU VM / slice [jpipe]
#   REMOTE_DIR        jpipe's folder on each worker, relative to the home folder [jpipe]
#   REPO_URL          git URL to clone on the workers; empty: ship this checkout instead []
#   REPO_REF          branch, tag or commit of REPO_URL [main]
#   PYTHON_VERSION    Python of the workers' virtual environment [3.12]
#   JAX_PACKAGE       the JAX requirement to install [jax[tpu]]
#   ARCHIVE           where the local source archive is written [${TMPDIR:-/tmp}/jpipe-src-TPU_NAME.tar.gz]
#
# Options:
#   -n, --dry-run     print the exact commands instead of running them
#   -h, --help        print this help
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
JAX_PACKAGE="${JAX_PACKAGE:-jax[tpu]}"
ARCHIVE="${ARCHIVE:-${TMPDIR:-/tmp}/jpipe-src-${TPU_NAME}.tar.gz}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

parse_options "$@"
require PROJECT
if ((${#EXTRA_ARGS[@]} > 0)); then
  echo "error: install.sh takes no arguments after --" >&2
  exit 2
fi

dir="$(quote "$REMOTE_DIR")"
if [[ -z "$REPO_URL" ]]; then
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:jpipe-src.tar.gz" \
    --project="$PROJECT" --zone="$ZONE" --worker=all
  source_step="mkdir -p $dir && tar -xzf jpipe-src.tar.gz -C $dir && rm jpipe-src.tar.gz"
else
  url="$(quote "$REPO_URL")"
  ref="$(quote "$REPO_REF")"
  source_step="if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin $ref; "
  source_step+="else git clone --quiet $url $dir && git -C $dir fetch --quiet origin $ref; fi"
  source_step+=" && git -C $dir checkout --quiet FETCH_HEAD"
fi
setup="set -euo pipefail; $source_step"
setup+="; if [ ! -x ~/.local/bin/uv ]; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi"
setup+="; cd $dir && ~/.local/bin/uv venv --allow-existing --python $(quote "$PYTHON_VERSION") .venv"
setup+=" && ~/.local/bin/uv pip install --python .venv/bin/python -e . \"$JAX_PACKAGE\""
setup+=" && .venv/bin/python -c \"import jax, jpipe; print(jax.__version__, jpipe.__version__)\""
tpu_vm ssh --worker=all --command "$setup"
