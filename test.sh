#!/usr/bin/env bash
# Runs every test jobcast has: formatting, lints, unit and integration tests.
# This is the README's test command; .ci/run calls it on a fresh clone with CI=true.
set -euo pipefail
cd "$(dirname "$0")"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --workspace
