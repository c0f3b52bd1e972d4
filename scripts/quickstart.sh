#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash scripts/quickstart.sh serve   # set up, then serve deploy/local.yaml and stream a sample
#   bash scripts/quickstart.sh test    # set up (pdserve, and guidellm/AIPerf in .venv-tools), then run
#                                      # the test suite (GPU tests skip without a GPU)
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

# The field's load generators, for tests/e2e/test_bench_tools_e2e.py: from PyPI, in a virtual
# environment of their own (they are not pdserve dependencies; guidellm needs torch, given the
# same CPU build as above). Set PDSERVE_SKIP_TOOLS=1 to leave them out.
TOOLS_VENV="${PDSERVE_TOOLS_VENV:-.venv-tools}"
TOOLS_SPEC="guidellm==0.8.1 aiperf==0.13.0"

setup_tools() {
  [ -z "${PDSERVE_SKIP_TOOLS:-}" ] || return 0
  local stamp="$TOOLS_VENV/.pdserve-installed"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$TOOLS_SPEC" ]; then
    [ -x "$TOOLS_VENV/bin/python" ] || "$PY" -m venv "$TOOLS_VENV"
    "$TOOLS_VENV/bin/python" -m pip install -q --upgrade pip
    if ! "$TOOLS_VENV/bin/python" -c "import torch" 2>/dev/null; then
      "$TOOLS_VENV/bin/python" -m pip install -q "$("$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])')"
    fi
    echo "installing $TOOLS_SPEC (test tools) ..."
    # shellcheck disable=SC2086
    "$TOOLS_VENV/bin/python" -m pip install -q $TOOLS_SPEC
    echo "$TOOLS_SPEC" > "$stamp"
  fi
  local bin
  bin="$(cd "$TOOLS_VENV/bin" && pwd)"
  export PDSERVE_GUIDELLM="${PDSERVE_GUIDELLM:-$bin/guidellm}"
  export PDSERVE_AIPERF="${PDSERVE_AIPERF:-$bin/aiperf}"
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
    setup_tools
    shift
    exec "$VENV/bin/python" -m pytest -q tests "$@"
    ;;
  *)
    echo "usage: bash scripts/quickstart.sh serve|test" >&2
    exit 2
    ;;
esac
