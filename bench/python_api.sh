#!/usr/bin/env bash
# Python API timings, side by side in one run:
#   - `import dstack` (dstack-rs, release wheel) vs `import dstack.api` (dstack 0.22.5 from
#     PyPI, in a throw-away venv);
#   - apply_configuration -> running from Python vs submit -> running from the Rust API
#     (the engine_latency example), both on the local backend with `true` tasks;
#   - how long Ctrl-C takes to interrupt run.wait() and run.logs() (target: 200 ms).
#   usage: bench/python_api.sh [N]   (default 200 runs for latency)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
n="${1:-200}"
ours="${DSTACK_BENCH_PY_VENV:-$HOME/.cache/dstack-rs/bench-venv}"
theirs="${DSTACK_BENCH_VENV:-${TMPDIR:-/tmp}/dstack-0.22.5-venv}"
if [ ! -x "$theirs/bin/python" ] || ! "$theirs/bin/python" -c 'import dstack' 2>/dev/null; then
  python3 -m venv "$theirs"
  "$theirs/bin/pip" install -q "dstack==0.22.5"
fi
[ -x "$ours/bin/python" ] || python3 -m venv "$ours"
"$ours/bin/pip" install -q --disable-pip-version-check "maturin>=1.5,<2"
MATURIN_PEP517_ARGS="--profile release" "$ours/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps .
cargo build -q --release -p dstack-agent
cargo build -q --release -p dstack-backends --example engine_latency

"$ours/bin/python" bench/python_api.py import "$ours/bin/python" dstack
"$theirs/bin/python" bench/python_api.py import "$theirs/bin/python" dstack.api
home="$(mktemp -d)"
trap 'kill -9 "$(cat "$home/agent/agent.pid" 2>/dev/null)" 2>/dev/null; rm -rf "$home"' EXIT
DSTACK_HOME="$home" "$ours/bin/python" bench/python_api.py latency "$n"
DSTACK_HOME="$home" "$ours/bin/python" bench/python_api.py interrupt 20
"$CARGO_TARGET_DIR/release/examples/engine_latency" "$n" 0 | grep -E 'floor|submit'
