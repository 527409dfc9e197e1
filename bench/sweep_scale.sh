#!/usr/bin/env bash
# Sweeps at scale (issue 28): the 1000-trial sweep through the Python API, the same tasks
# through Ray and the floor, in one run on this machine; then 100 / 1,000 / 10,000 trials, and
# 1,000 trials in a home that already holds 10,000 finished runs. Each of ours in a fresh
# $DSTACK_HOME whose server is stopped after.
#
# usage: bench/sweep_scale.sh [PYTHON]   (PYTHON: an interpreter with dstack installed,
#        e.g. `pip install .` with MATURIN_PEP517_ARGS=--release; default python3)
# Ray goes into a throw-away virtual environment ($RAY_VENV, default a temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
WORK=$(mktemp -d)
HOMES=()
stop_servers() {
    # Only the servers and agents of the homes made here.
    for home in "${HOMES[@]}"; do
        for pid in $(pgrep -f -- "$home" || true); do kill "$pid" 2>/dev/null || true; done
        if [[ -f "$home/server/server.json" ]]; then
            pid=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("pid", ""))' "$home/server/server.json" 2>/dev/null || true)
            [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
        fi
    done
}
trap 'stop_servers; rm -rf "$WORK"' EXIT
ours() { # ours N [HOME]
    local home=${2:-$(mktemp -d "$WORK/home.XXXX")}
    HOMES+=("$home")
    DSTACK_HOME=$home "$PYTHON" bench/sweep_scale.py ours "$1"
}

RAY_VENV=${RAY_VENV:-$WORK/ray-venv}
if [[ ! -x "$RAY_VENV/bin/python" ]]; then
    python3 -m venv "$RAY_VENV"
    "$RAY_VENV/bin/pip" install -q "ray>=2,<3"
fi

echo "== 1000 trials: ours, Ray, the floor"
ours 1000
"$RAY_VENV/bin/python" bench/sweep_scale.py ray 1000
python3 bench/sweep_scale.py floor 1000

echo "== time per trial by size"
for n in 100 1000 10000; do ours "$n"; done

echo "== 1000 trials in a home holding 10,000 finished runs"
full=$(mktemp -d "$WORK/home.XXXX")
HOMES+=("$full")
DSTACK_HOME=$full "$PYTHON" bench/sweep_scale.py finished 10000
ours 1000 "$full"
