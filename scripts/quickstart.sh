#!/usr/bin/env bash
# Install into .venv and run the architecture study configs/compare_tiny.toml on the embedded default corpus
# (the stdlib's *.py files): tiny decoder, SAMBA, DLCM and pure-Mamba runs on one matched token budget, each
# measured the same way (bits/byte at 1x and 4x the training length, FLOPs, decode speed, latency and cache
# against context, speculative decoding), ending in report.md, report.json and four plots in runs/compare_tiny.
# Rerunning does only the missing work. STUDY=configs/other.toml scripts/quickstart.sh runs another study.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$SECONDS
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[plot]"
printf 'installed in %ds\n' $((SECONDS - START))
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
.venv/bin/python scripts/compare.py "${STUDY:-configs/compare_tiny.toml}" "$@"
printf '\nquickstart: %d min %d s (install included)\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60))
