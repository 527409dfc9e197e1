#!/usr/bin/env bash
# Side-by-side configuration parsing throughput: dstack-rs vs dstack 0.22.5 (from PyPI, in a
# throw-away venv), on the same files, in the same run.
#   usage: bench/compare_dstack.sh [CONFIG_DIR]   (default: ../shared/corpus/valid)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
dir="${1:-../shared/corpus/valid}"
mapfile -t files < <(ls "$dir"/*.dstack.yml | grep -v '/preset-')
venv="${DSTACK_BENCH_VENV:-${TMPDIR:-/tmp}/dstack-0.22.5-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import dstack' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "dstack==0.22.5"
fi
cargo build -q --release -p dstack-core --example parse_throughput
ours=$("$CARGO_TARGET_DIR/release/examples/parse_throughput" 2000 "${files[@]}")
theirs=$("$venv/bin/python" bench/dstack_parse.py 20 "${files[@]}")
echo "$ours"
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import sys
_, n, _, ours = sys.argv[1].split()
_, _, _, theirs = sys.argv[2].split()
ours, theirs = float(ours), float(theirs)
print(f"configurations: {n}")
print(f"dstack-rs: {ours * 1e6:.1f} us/config, {1 / ours:,.0f} configs/s")
print(f"dstack 0.22.5: {theirs * 1e6:.1f} us/config, {1 / theirs:,.0f} configs/s")
print(f"ratio: {theirs / ours:.1f}x")
PY
