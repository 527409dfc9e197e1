# Sourced by the checks against dstack 0.22.5: sets $venv to a venv holding dstack==0.22.5 from
# PyPI (DSTACK_SHAPES_VENV, default ~/.cache/dstack-rs/dstack-0.22.5-venv), made on first use.
venv="${DSTACK_SHAPES_VENV:-$HOME/.cache/dstack-rs/dstack-0.22.5-venv}"
if ! "$venv/bin/python" -c 'import dstack.version as v; assert v.__version__ == "0.22.5"' 2>/dev/null; then
  echo "==> dstack 0.22.5 into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "dstack==0.22.5"
fi
