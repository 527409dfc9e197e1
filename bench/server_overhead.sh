#!/usr/bin/env bash
# The server's cost, side by side in one run: a whole `dstack apply` of a trivial local task
# with the CLI of BEFORE (default cf4cebc: the engine inside the CLI) and of this checkout (a
# client of the home's server), then the server's idle memory and CPU; then Python
# apply_configuration -> running through the server next to the Rust API hosting the engine
# in-process (what Python did before: its engine ran in the interpreter).
#   usage: bench/server_overhead.sh [BEFORE] [N]      (release builds; BEFORE in a worktree)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
before="${1:-cf4cebc}"
n="${2:-20}"
before_target="${DSTACK_BENCH_BEFORE_TARGET:-$HOME/.cache/dstack-rs/target-before}"
tree="$(mktemp -d)/before"
git worktree add -q --detach "$tree" "$before"
cleanup() { git worktree remove --force "$tree" 2>/dev/null || true; }
trap cleanup EXIT
(cd "$tree" && CARGO_TARGET_DIR="$before_target" cargo build -q --release -p dstack-cli -p dstack-agent)
cargo build -q --release -p dstack-cli -p dstack-agent
python3 bench/server_overhead.py apply "$before_target/release/dstack" "$CARGO_TARGET_DIR/release/dstack" "$n" | tee /tmp/server_overhead.out
home="$(sed -n 's/^homes: //p' /tmp/server_overhead.out)/after"
python3 bench/server_overhead.py idle "$home" 30
for h in "$home" "${home%/after}/before"; do
  [ -f "$h/agent/agent.pid" ] && kill "$(cat "$h/agent/agent.pid")" 2>/dev/null || true
done
kill "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$home/server/server.json")" 2>/dev/null || true
