#!/usr/bin/env bash
# GPU smoke test: bash scripts/gpu_smoke.sh [--require-gpu]
# One process, world size 1 (NCCL on CUDA, gloo on CPU). On CPU the CUDA-only checks report "skipped".
# Figures (log-prob kernel vs LM-head GEMM, memory freed by vLLM sleep) are printed as JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
exec "$PY" scripts/gpu_smoke.py "$@"
