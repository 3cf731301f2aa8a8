#!/usr/bin/env bash
# Run the test suite: creates the virtual environment and installs jpipe with its test extra when
# needed, then runs pytest over tests/ with any arguments given (e.g. -m "not slow" -x).
#
# JPIPE_VENV (default .venv) names the virtual environment and JPIPE_PYTHON (default python3) the
# interpreter that creates it. JPIPE_LOCK picks the versions installed:
#   auto (default): requirements/lock-py<major><minor>.txt for the interpreter's Python where that
#     file exists (Python 3.11: requirements/lock-py311.txt, jax 0.10.2, the versions CI's first
#     half tests), used as pip constraints; for other Pythons, the newest versions;
#   none: the newest versions the interpreter can run (Python 3.12: jax 0.12; CI's second half);
#   a file's path: that constraints file.
# An existing environment is reinstalled in place when the lock it was installed with changed
# (recorded in <venv>/jpipe-lock.txt). `bash scripts/lock.sh` refreshes the lock file.
# .ci/run runs this script for both halves.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${JPIPE_VENV:-.venv}"
python="${JPIPE_PYTHON:-python3}"
lock="${JPIPE_LOCK:-auto}"
if [ "$lock" = auto ]; then
  lock="requirements/lock-py$("$python" -c 'import sys; print("%d%d" % sys.version_info[:2])').txt"
  [ -f "$lock" ] || lock=none
elif [ "$lock" != none ] && [ ! -f "$lock" ]; then
  echo "error: JPIPE_LOCK: no constraints file $lock (expected auto, none or a file's path)" >&2
  exit 2
fi
# What the environment is installed with: "none", or the lock file's path and content digest.
wanted="none"
if [ "$lock" != none ]; then
  wanted="$lock $("$python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$lock")"
fi
if [ ! -x "$venv/bin/python" ] || [ ! -x "$venv/bin/jpipe" ] \
  || ! "$venv/bin/python" -c "import jpipe, pytest, xdist, hypothesis, nbclient, libtpu, tokenizers" 2>/dev/null \
  || [ "$(cat "$venv/jpipe-lock.txt" 2>/dev/null)" != "$wanted" ]; then
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" uninstall --quiet --yes jpipe 2>/dev/null || true  # the distribution's old name (now jpipe-pp)
  if [ "$lock" = none ]; then
    "$venv/bin/pip" install --quiet --upgrade --upgrade-strategy eager -e '.[test]'
  else
    echo "test.sh: installing the versions pinned in $lock (JPIPE_LOCK=none: the newest instead)"
    "$venv/bin/pip" install --quiet -c "$lock" -e '.[test]'
  fi
  echo "$wanted" >"$venv/jpipe-lock.txt"
fi
exec "$venv/bin/python" -m pytest -q "$@"
