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

echo "==> tests"
export FPM_REQUIRE_PYTHON=1
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

echo "==> doc tests"
cargo test --workspace --doc
