#!/usr/bin/env bash
# Catalog queries: dstack-rs vs gpuhunt (from PyPI) on the same synthetic gpuhunt-format
# catalog of N offers (default 120,000), both loaded in memory, median of R repeats each.
# Fails if the two disagree on how many offers match.
#   usage: bench/catalog_query.sh [N] [R]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
n="${1:-120000}" r="${2:-20}"
venv="$HOME/.cache/dstack-rs/bench-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q gpuhunt
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
python3 bench/gen_catalog.py "$dir" "$n"
cargo build -q --release -p dstack-core --example catalog_query
"$CARGO_TARGET_DIR/release/examples/catalog_query" "$dir" "$r" > "$dir/rs.tsv"
"$venv/bin/python" bench/gpuhunt_query.py "$dir" "$r" > "$dir/py.tsv"
echo "gpuhunt $("$venv/bin/pip" show gpuhunt | sed -n 's/^Version: //p'), $n offers, median of $r"
paste "$dir/rs.tsv" "$dir/py.tsv" | awk -F'\t' '
  { if ($2 != $5) { print "MISMATCH: " $1 ": dstack-rs " $2 " vs gpuhunt " $5; bad = 1 }
    printf "%-50s %6d matches   dstack-rs %8.3f ms   gpuhunt %9.3f ms   %6.0fx\n", $1, $2, $3, $6, $6 / $3 }
  END { exit bad }'
