#!/usr/bin/env bash
# Fresh machine -> installed project -> lint + type check + tests. The README's test command.
# VENV (default .venv) is created if missing. torch is installed FIRST and pinned to the
# CPU build on disk: anything unpinned would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
ruff check .
ruff format --check .
mypy
HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider "$@"
