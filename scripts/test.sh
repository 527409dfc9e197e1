#!/usr/bin/env bash
# Runs every check of the project: formatting, lints, unit/integration/property tests and the
# configuration-corpus parity check against dstack 0.22.5 (needs ../shared/corpus or
# $DSTACK_CORPUS_DIR). Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"

# Tests never reach a cloud's metadata service (nor any address but loopback and their own
# namespace hosts).
export AWS_EC2_METADATA_DISABLED=true
VENV="${DSTACK_TEST_VENV:-$HOME/.cache/dstack-rs/venv}"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (all targets and the cloud features, warnings are errors)"
cargo clippy --workspace --all-targets --features dstack-backends/aws,dstack-backends/gcp -- -D warnings
echo "==> cloud backend features compile alone"
cargo clippy -q -p dstack-backends --no-default-features --features aws -- -D warnings
cargo clippy -q -p dstack-backends --no-default-features --features gcp -- -D warnings
echo "==> cargo test"
cargo test --workspace --exclude dstack-py
echo "==> cloud backends: AWS against moto (pip install moto[server] into $VENV), GCP against a stand-in, and the conformance suite with them"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "moto[server]"
# The AWS tests run the `cloud_backends` example as a child process: build it by name (a test
# build of the examples leaves only hashed copies).
cargo build -q -p dstack-backends --features aws,gcp --example cloud_backends
MOTO_SERVER="$VENV/bin/moto_server" cargo test -p dstack-backends --features aws,gcp --lib --test aws --test gcp --test conformance --test artifacts_s3 --examples
# `dstack server` alone reaps an idle cloud instance (aws only; built with gcp too so that it
# shares the build above).
MOTO_SERVER="$VENV/bin/moto_server" cargo test -p dstack-server --features aws,gcp --test cloud_idle
echo "==> dstack 0.22.5's own models parse our answers (representative records, then a live server's)"
CARGO="cargo" bash scripts/check-dstack-shapes.sh
bash scripts/check-live-shapes.sh
echo "==> every verb and flag of dstack 0.22.5's CLI is ours or listed in the README as not supported yet"
bash scripts/check-cli-help.sh
echo "==> examples validate"
"$CARGO_TARGET_DIR/debug/dstack" validate examples/*.dstack.yml examples/workflows/.dstack/workflows.yaml
echo "==> python package, examples and notebooks"
bash scripts/test-python.sh
