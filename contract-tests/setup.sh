#!/usr/bin/env bash
# Creates (or reuses) the Python venv the contract and interop tests run against.
#
# The venv lives under target/ so `cargo clean` removes it and it is never committed.
# Upstream modules are fetched from PyPI at pinned versions; nothing of theirs is copied
# into this repository (numpy, scipy and scikit-learn are there for Dynamo's planner
# regression models, see python/planner.py; prometheus_client for the engine-metrics stand-in,
# interop/engine_metrics.py; pytest for the Python package's tests, fpm-py/tests). Pure-Python wheels that would drag in heavy dependencies
# (ai-dynamo, sglang) are fetched with `pip download --no-deps` and only the single
# module file each test needs is loaded from the wheel (see python/upstream.py).
#
# Usage: contract-tests/setup.sh          (prints the venv's python path on success)
# Env:   FPM_VENV  venv directory (default: <repo>/target/fpm-venv)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FPM_VENV:-$repo/target/fpm-venv}"
wheels="$venv/wheels"
stamp="$venv/.fpm-setup-v4"

if [[ -f "$stamp" && -x "$venv/bin/python" ]]; then
  echo "$venv/bin/python"
  exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null; then
  echo "setup.sh: $python not found; install Python 3.10+ (apt-get install python3 python3-venv)" >&2
  exit 1
fi

mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv" >&2
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install \
  "msgspec==0.22.0" \
  "pyzmq==27.3.0" \
  "nats-py==2.16.0" \
  "ai-dynamo-runtime==1.6.1" \
  "numpy==2.4.6" \
  "scipy==1.17.1" \
  "scikit-learn==1.9.1" \
  "prometheus_client==0.23.1" \
  "pytest==8.4.2" >&2
mkdir -p "$wheels"
"${pip[@]}" download --no-deps -d "$wheels" "ai-dynamo==1.6.1" "sglang==0.5.23" >&2
touch "$stamp"
echo "$venv/bin/python"
