#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit/integration/contract tests, doc tests.
# Needs network access to PyPI the first time (the contract venv under target/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> contract venv (msgspec, pyzmq, nats-py, ai-dynamo-runtime; ai-dynamo and sglang wheels)"
bash contract-tests/setup.sh >/dev/null

echo "==> cargo fmt --check"
cargo fmt --all --check

echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
# The CUDA timing path (cudarc, libcuda loaded at run time) builds everywhere.
cargo clippy -p fpm-emitter --all-targets --features cuda -- -D warnings

echo "==> tests"
export FPM_REQUIRE_PYTHON=1 FPM_REQUIRE_PROMETHEUS=1
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

echo "==> fpm-emitter with the cuda feature (GPU tests run only with --ignored on a GPU machine)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run -p fpm-emitter --features cuda --no-fail-fast
else
  cargo test -p fpm-emitter --features cuda --no-fail-fast
fi

echo "==> doc tests"
cargo test --workspace --doc

echo "==> the Python package (fpm-py: built with maturin into the contract venv) and its pytest suite"
py="$(bash contract-tests/setup.sh)"
"$py" -m pip install --disable-pip-version-check -q ./fpm-py
cargo build -q -p fpm-cli
"$py" -m pytest -q fpm-py/tests
