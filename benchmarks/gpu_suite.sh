#!/usr/bin/env bash
# The GPU check in one short run (issue 21 item 4): ours vs normflows, plain vs
# memory_efficient memory, every family's images/s and a Config A hierarchical step,
# written to one markdown file. The driver and its options: benchmarks/gpu_suite.py.
#
#   bash benchmarks/gpu_suite.sh                        # on a CUDA machine: gpu_suite.md
#   bash benchmarks/gpu_suite.sh --out runs/gpu.md      # elsewhere
#   bash benchmarks/gpu_suite.sh --dry-run --out /tmp/t.md   # CPU, tiny sizes (the test)
#
# Interpreter: $PYTHON if set, else the active virtual environment's, else the
# repository's .venv, else python3.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then python="$VIRTUAL_ENV/bin/python"
    elif [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"
    else python=python3; fi
fi
# The repository on the module path, so `-m benchmarks.gpu_suite` works from any directory
# (and --out stays relative to the caller's).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export GPU_SUITE_LAUNCHER="bash benchmarks/gpu_suite.sh"
exec "$python" -m benchmarks.gpu_suite "$@"
