#!/usr/bin/env bash
# Run the test suite: creates .venv and installs jpipe with its test extra when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import jpipe, pytest, hypothesis, nbclient, libtpu" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[test]'
fi
exec .venv/bin/python -m pytest -q "$@"
