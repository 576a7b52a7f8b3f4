#!/usr/bin/env bash
# One-shot GPU check (issue 19): everything that needs a GPU, in one run, downloading nothing.
#   bash benchmarks/gpu_check.sh [--dry-run] [--json PATH] [--budget-s 480] [--only PART]
# --dry-run checks the script's own setup on a CPU machine (make test runs it). See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check "$@"
