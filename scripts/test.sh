#!/usr/bin/env bash
# Run the test suite: creates the virtual environment and installs jpipe with its test extra when
# needed, then runs pytest over tests/ with any arguments given (e.g. -m "not slow" -x).
#
# JPIPE_VENV (default .venv) names the virtual environment and JPIPE_PYTHON (default python3) the
# interpreter that creates it; pip installs the newest jax that interpreter can run (Python 3.11:
# jax 0.10.2; Python 3.12: jax 0.12). .ci/run runs this script for both.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${JPIPE_VENV:-.venv}"
python="${JPIPE_PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ] || [ ! -x "$venv/bin/jpipe" ] \
  || ! "$venv/bin/python" -c "import jpipe, pytest, hypothesis, nbclient, libtpu, tokenizers" 2>/dev/null; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" uninstall --quiet --yes jpipe 2>/dev/null || true  # the distribution's old name (now jpipe-pp)
  "$venv/bin/pip" install --quiet -e '.[test]'
fi
exec "$venv/bin/python" -m pytest -q "$@"
