#!/usr/bin/env bash
# Adds the router's HTTP and metrics dependencies (aiohttp and its deps, prometheus-client) to
# the GPU bundle that ../shared/gpu/pack-ray.sh writes: the GPU machines have no network, and
# their Python is 3.12. Run after pack-ray.sh, from the repository root:
#   bash ../shared/gpu/pack-ray.sh && bash bench/pack_gpu_extras.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devpack/wheels
"${PYTHON:-.venv/bin/python}" -m pip download -q --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --implementation cp \
  -d .devpack/wheels aiohttp prometheus-client
ls .devpack/wheels
