# Sourced by the scripts: create $VENV (default .venv) if needed, activate it, and install
# torch FIRST, pinned to the CPU build (anything unpinned pulls a multi-GB CUDA build),
# then this project with the extras in $1 (e.g. "[dev]").
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
echo "venv.sh: $VENV: pip install torch==2.13.0, then pip install -e \".${1:-}\"" >&2
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".${1:-}"
