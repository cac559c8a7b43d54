#!/usr/bin/env bash
# Fresh machine -> installed project -> the default compile (all-MiniLM-L6-v2, target cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh ""  # no extras; "" so that this script's own arguments are not passed on
HF_HUB_OFFLINE=1 compressor compile "$@"
