//! Helpers for the contract tests: locating the Python venv and reading vectors.
