#!/usr/bin/env bash
# Fresh machine -> installed project -> lint + type check + tests. The README's test command.
#   scripts/test.sh          the fast tier: every test not marked @pytest.mark.slow (minutes)
#   scripts/test.sh --all    every test, the slow tier too: real MiniLM compiles, AOTInductor
#                            builds, the CMake runner build, torchrun, the kernels' arch builds
# Any other argument goes to pytest (e.g. `scripts/test.sh --all tests/kernels -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=(-m "not slow")
args=()
for arg in "$@"; do
    if [ "$arg" = "--all" ]; then tier=(); else args+=("$arg"); fi
done
. scripts/venv.sh "[dev]"
ruff check .
ruff format --check .
mypy
HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider ${tier[@]+"${tier[@]}"} ${args[@]+"${args[@]}"}
