#!/usr/bin/env bash
# The first hour on a GPU node, as a checklist that passes or names what is wrong (about 8 minutes):
#   bash jobs/gpu_check.sh [--cpu] [--out DIR] [--only STEP,...]      (--list: the steps)
# Installs nothing: runs LSURF_PYTHON (default python3, the node's own torch) on this checkout.
# Writes DIR/summary.txt (one line per step) and DIR/numbers.json as each step ends; default out/gpu_check.
# Exit: 0 all ok or skipped, 1 a step FAILED, 2 the node cannot run the check (one line on stderr).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${LSURF_PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
    echo "gpu_check: error: LSURF_PYTHON=$PY is not a Python 3.10 or later" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$ROOT/jobs/gpu_check.py" "$@"
