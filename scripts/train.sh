#!/usr/bin/env bash
# The main job: a short pipeline-parallel training run (GPT, data 2 x stage 4, 1f1b) on 8 fake CPU
# devices with the Python standard library as text. Creates .venv on first use with what training
# needs (`pip install -e .`: no libtpu, no test tools; scripts/test.sh adds those). Extra arguments
# go to `python -m jpipe.train` (see --help); output goes to runs/quickstart unless --out is given.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import jpipe, optax, orbax.checkpoint" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip uninstall --quiet --yes jpipe 2>/dev/null || true  # the distribution's old name (now jpipe-pp)
  .venv/bin/pip install --quiet -e .
fi
args=("$@")
if [[ " $* " != *" --resume "* && " $* " != *" --out "* && -d runs/quickstart ]]; then
  # A fresh quick start each time; the previous one is kept as runs/quickstart.previous.
  rm -rf runs/quickstart.previous
  mv runs/quickstart runs/quickstart.previous
  echo "moved the previous quick start run to runs/quickstart.previous"
fi
exec .venv/bin/python -m jpipe.train --preset quickstart "${args[@]}"
