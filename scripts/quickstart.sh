#!/usr/bin/env bash
# Install into .venv and run the main job on the embedded default corpus (the stdlib's *.py files):
# tiny training runs, a decoding eval with and without suffix-automaton speculation, a comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[plot]"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
P=.venv/bin/python
RUNS=${RUNS:-runs}
ARCHS=${ARCHS:-"decoder samba dlcm"}
N_PROMPTS=${N_PROMPTS:-6}
NEW_TOKENS=${NEW_TOKENS:-128}

step() { printf '\n== %s\n' "$*"; }

for arch in $ARCHS; do
  step "train ${arch}_tiny"
  $P -m train "configs/${arch}_tiny.toml" --run-dir "$RUNS/${arch}_tiny"
done

first=$(echo $ARCHS | cut -d' ' -f1)
step "static suffix automaton over the training split"
[ -f "$RUNS/sam/header.json" ] || $P -m decode.build_sam "$RUNS/${first}_tiny" --out "$RUNS/sam"

step "held-out code-continuation prompts"
$P -m decode.prompts "$RUNS/${first}_tiny" --out "$RUNS/prompts.jsonl" --n "$N_PROMPTS" --prompt-tokens 256

for arch in $ARCHS; do
  step "decoding eval: ${arch}_tiny, plain vs pld vs sam (greedy; speculative output must equal plain)"
  $P -m decode.eval "$RUNS/${arch}_tiny" --prompts "$RUNS/prompts.jsonl" --drafter pld,sam \
    --sam "$RUNS/sam" --max-new-tokens "$NEW_TOKENS" --out "$RUNS/${arch}_tiny/"
done

step "comparison"
runs=""; for arch in $ARCHS; do runs="$runs $RUNS/${arch}_tiny"; done
$P scripts/compare.py $runs --out "$RUNS/compare"
