#!/usr/bin/env bash
# Checks dstack_core::api's JSON against dstack 0.22.5's own pydantic models (from PyPI, in a
# cached venv): the Rust test writes representative answers (runs, plans, fleets, volumes, log
# pages, errors), dstack's models parse them strictly, the requests dstack's client would send
# next (get_plan, apply, logs/poll) are dumped by dstack's code and read back by the Rust side.
#   usage: scripts/check-dstack-shapes.sh [--lenient] [JSON_FILE_OR_DIR...]
# With paths, only those (e.g. a live server's answers, named <Model>.<case>.json) are
# checked; --lenient parses as dstack's client does (unknown fields dropped).
# The configuration corpus' valid files (${DSTACK_CORPUS_DIR:-../shared/corpus}/valid), when
# present, are added as plans, fleets and volumes (and their requests read back).
# Environment: DSTACK_SHAPES_VENV (default ~/.cache/dstack-rs/dstack-0.22.5-venv),
# DSTACK_CORPUS_DIR, CARGO_TARGET_DIR, CARGO (e.g. "flock -o /tmp/cargo.lock cargo").
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
cargo=(${CARGO:-cargo})
source scripts/dstack-venv.sh

lenient=()
if [ "${1:-}" = "--lenient" ]; then
  lenient=(--lenient)
  shift
fi
if [ "$#" -gt 0 ]; then
  exec "$venv/bin/python" scripts/check_dstack_shapes.py "${lenient[@]}" "$@"
fi

corpus="${DSTACK_CORPUS_DIR:-../shared/corpus}/valid"
if [ -d "$corpus" ]; then
  DSTACK_SHAPES_CORPUS="$(cd "$corpus" && pwd)"
  export DSTACK_SHAPES_CORPUS
else
  echo "(no corpus at $corpus: the representative cases only)"
fi
out="$(mktemp -d "${TMPDIR:-/tmp}/dstack-shapes.XXXXXX")"
trap 'rm -rf "$out"' EXIT
echo "==> answers (cargo test --test dstack_shapes) into $out"
DSTACK_SHAPES_OUT="$out" "${cargo[@]}" test -q -p dstack-core --test dstack_shapes writes_dstack_shapes
echo "==> parsed by dstack 0.22.5's models"
"$venv/bin/python" scripts/check_dstack_shapes.py "${lenient[@]}" --requests "$out/requests" "$out"
echo "==> dstack's client requests read back"
DSTACK_SHAPES_REQUESTS="$out/requests" "${cargo[@]}" test -q -p dstack-core --test dstack_shapes reads_what_dstack_clients_send
echo "dstack shapes: ok"
