#!/usr/bin/env bash
# Runs every check of the project: formatting, lints, unit/integration/property tests and the
# configuration-corpus parity check against dstack 0.22.5 (needs ../shared/corpus or
# $DSTACK_CORPUS_DIR). Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo test"
cargo test --workspace --exclude dstack-py
echo "==> examples validate"
"$CARGO_TARGET_DIR/debug/dstack" validate examples/*.dstack.yml
echo "==> python package, examples and notebooks"
bash scripts/test-python.sh
