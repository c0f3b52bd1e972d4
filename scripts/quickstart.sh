#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash scripts/quickstart.sh serve   # set up, then serve deploy/local.yaml and stream a sample
#   bash scripts/quickstart.sh test    # set up, then run the test suite (GPU tests skip without a GPU)
# Setup makes .venv with a CPU build of torch when the machine has no NVIDIA GPU
# (set TORCH_SPEC to override), then installs pdserve with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PDSERVE_VENV:-.venv}"
PY="${PYTHON:-python3}"

setup() {
  local stamp="$VENV/.pdserve-installed"
  local want
  want="$(sha256sum pyproject.toml | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ -z "${TORCH_SPEC:-}" ]; then
      if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch"; else TORCH_SPEC="torch==2.13.0"; fi
    fi
    echo "installing $TORCH_SPEC ..."
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  fi
  echo "installing pdserve[dev,bench] ..."
  "$VENV/bin/python" -m pip install -q -e ".[dev,bench]"
  echo "$want" > "$stamp"
}

case "${1:-}" in
  serve)
    setup
    shift
    exec "$VENV/bin/pdserve" up deploy/local.yaml --demo "$@"
    ;;
  setup-only)
    setup
    ;;
  test)
    setup
    shift
    exec "$VENV/bin/python" -m pytest -q tests "$@"
    ;;
  *)
    echo "usage: bash scripts/quickstart.sh serve|test" >&2
    exit 2
    ;;
esac
