#!/usr/bin/env bash
# Fresh machine -> installed project -> lint + type check + tests. The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh "[dev]"
ruff check .
ruff format --check .
mypy
HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider "$@"
