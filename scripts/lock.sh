#!/usr/bin/env bash
# Refresh the lock file of the test environment: a fresh virtual environment gets jpipe with its test
# extra (`pip install -e '.[test]'`, the newest versions the interpreter can run), and its `pip freeze`
# becomes requirements/lock-py<major><minor>.txt, which scripts/test.sh installs with as constraints.
#
# JPIPE_PYTHON (default python3) names the interpreter: `bash scripts/lock.sh` on Python 3.11 writes
# requirements/lock-py311.txt, the versions CI's first half (.ci/run) tests. Commit the file it writes.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${JPIPE_PYTHON:-python3}"
version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
tag="py${version/./}"
lock="requirements/lock-$tag.txt"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$python" -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install --quiet --upgrade pip
"$scratch/venv/bin/pip" install --quiet -e '.[test]'
versions="$("$scratch/venv/bin/python" -c 'import sys, jax, flax; print(f"Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}")')"
mkdir -p requirements
{
  echo "# The test environment's pinned versions ($versions): scripts/test.sh installs"
  echo "# with them as constraints on Python $version (pip install -c $lock -e '.[test]')."
  echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d) from a fresh install; run it again to refresh."
  "$scratch/venv/bin/pip" freeze --exclude-editable --exclude jpipe-pp
} >"$lock.tmp"
mv "$lock.tmp" "$lock"
echo "wrote $lock ($(grep -vc '^#' "$lock") pinned packages; $versions)"
