#!/usr/bin/env bash
# Every verb and flag of dstack 0.22.5's CLI (its own argparse parser, from PyPI in a cached
# venv) is in our `dstack … --help`, or in the README table "CLI flags not supported yet".
#   usage: scripts/check-cli-help.sh [PATH_TO_DSTACK]   (default: $CARGO_TARGET_DIR/debug/dstack)
# Environment: DSTACK_SHAPES_VENV (see scripts/dstack-venv.sh), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
source scripts/dstack-venv.sh
exec "$venv/bin/python" scripts/check_cli_help.py "${1:-$CARGO_TARGET_DIR/debug/dstack}" README.md
