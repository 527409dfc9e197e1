#!/usr/bin/env bash
# The Python side: builds and installs the package with `pip install .` (the wheel, with its
# bundled `dstack` and `dstack-agent`) into a virtualenv, then runs the pytest suite (with
# examples/lab.dstack.yml for real: JupyterLab from PyPI, `ssh <run>`, `dstack attach`), mypy
# --strict on the package and the examples, stubtest on the native module's stubs, every
# examples/*.py, and every notebook
# (headless, nbclient) — all against the default (a server started on demand) in throwaway $DSTACK_HOMEs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstack-rs/target}"
VENV="${DSTACK_TEST_VENV:-$HOME/.cache/dstack-rs/venv}"
# Tests build in the dev profile (as `cargo test` does): shared builds, no release wait.
export MATURIN_PEP517_ARGS="${MATURIN_PEP517_ARGS:---profile dev}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> python venv $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
echo "==> pip install test tools"
# jupyterlab: tests/test_lab.py runs examples/lab.dstack.yml, whose job finds `jupyter` on
# this venv's PATH (the test fails, never skips, without it).
"$PY" -m pip install -q --disable-pip-version-check \
  "maturin>=1.5,<2" pytest mypy nbclient nbformat ipykernel numpy pandas jupyterlab
echo "==> pip install . ($MATURIN_PEP517_ARGS)"
"$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps .

# Every $DSTACK_HOME of this run lives under one directory (fresh_home runs in a subshell,
# so a list of homes kept in a variable would be lost); at exit their agents are stopped and
# the directory removed.
HOMES="$(mktemp -d)"
cleanup() {
  # Each home's server (it would exit a moment after its home is removed, writing meanwhile)
  # and agent.
  while IFS= read -r -d '' info; do
    kill -9 "$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$info")" 2>/dev/null || true
  done < <(find "$HOMES" -path '*/server/server.json' -print0 2>/dev/null)
  while IFS= read -r -d '' pid_file; do
    kill -9 "$(cat "$pid_file")" 2>/dev/null || true
  done < <(find "$HOMES" -path '*/agent/agent.pid' -print0 2>/dev/null)
  rm -rf "$HOMES" 2>/dev/null || { sleep 1; rm -rf "$HOMES"; }
}
trap cleanup EXIT
fresh_home() {
  mktemp -d -p "$HOMES"
}

echo "==> pytest"
(cd dstack-py && DSTACK_HOME="$(fresh_home)" "$PY" -m pytest -q -p no:cacheprovider \
  --basetemp "$HOMES/pytest" tests)
echo "==> mypy --strict (package and examples)"
"$PY" -m mypy --strict --no-incremental dstack-py/python/dstack examples/*.py
echo "==> stubtest (dstack/_native.pyi against the built extension)"
"$PY" -m mypy.stubtest dstack._native
for example in examples/*.py; do
  echo "==> $example"
  DSTACK_HOME="$(fresh_home)" "$PY" "$example" >/dev/null
done
for notebook in notebooks/*.ipynb; do
  echo "==> $notebook"
  DSTACK_HOME="$(fresh_home)" "$PY" - "$notebook" <<'PY'
import sys

import nbclient
import nbformat

path = sys.argv[1]
notebook = nbformat.read(path, as_version=4)
nbclient.NotebookClient(
    notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": "notebooks"}}
).execute()
PY
done
