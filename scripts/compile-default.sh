#!/usr/bin/env bash
# Fresh machine -> installed project -> the default compile (all-MiniLM-L6-v2, target cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e .
HF_HUB_OFFLINE=1 compressor compile "$@"
