#!/usr/bin/env bash
# Create .venv, install the project with its test extra, and run the test suite (CPU, 2 cores).
# Two pytest-xdist workers, one test file each at a time (--dist loadfile: a file's module fixtures, such as
# test_faults' reference runs, are built once); compilation is single-threaded, so two workers use both cores.
# PYTEST_WORKERS=0 runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test,plot]"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
WORKERS=${PYTEST_WORKERS:-2}
if [ "$WORKERS" = 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -n "$WORKERS" --dist loadfile "$@"
