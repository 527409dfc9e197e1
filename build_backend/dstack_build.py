"""The PEP 517 build backend of the `dstack-rs` Python package: maturin, after building the
`dstack` and `dstack-agent` executables that the wheel carries in `dstack/bin/` (the
embedded client starts that agent; the `dstack` console script runs that CLI).

The cargo profile follows maturin's: `--profile NAME` (or `--release`, the default for
wheels) from `MATURIN_PEP517_ARGS` or the `build-args` config setting.

Cloud backends are opt-in (they are heavy builds): `DSTACK_CLOUD_FEATURES=aws,gcp pip install .`
builds the extension and the bundled CLI with them, so `Client.from_config()` and `dstack`
use the backends configured in `$DSTACK_HOME/config.yml`.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional

import maturin
from maturin import (  # noqa: F401 - the hooks pip calls are maturin's
    build_sdist,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_wheel,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "dstack-py" / "python" / "dstack" / "bin"
PACKAGES = ["dstack-cli", "dstack-agent"]
CLOUDS = {"aws", "gcp"}


def _clouds() -> list:
    """The cloud features asked for in `DSTACK_CLOUD_FEATURES` (comma-separated)."""
    asked = [f.strip() for f in os.environ.get("DSTACK_CLOUD_FEATURES", "").split(",") if f.strip()]
    unknown = set(asked) - CLOUDS
    if unknown:
        raise RuntimeError(
            f"DSTACK_CLOUD_FEATURES: unknown {', '.join(sorted(unknown))}; expected some of aws, gcp"
        )
    return asked


def _profile(config_settings: Optional[Mapping[str, Any]]) -> str:
    args = maturin.get_maturin_pep517_args(config_settings)
    for i, arg in enumerate(args):
        if arg == "--profile" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--profile="):
            return arg.split("=", 1)[1]
    return "release"


def _build_binaries(config_settings: Optional[Mapping[str, Any]]) -> None:
    command = [os.environ.get("CARGO", "cargo"), "build", "--locked", "--profile"]
    command += [_profile(config_settings), "--message-format=json-render-diagnostics"]
    for package in PACKAGES:
        command += ["-p", package]
    clouds = _clouds()
    if clouds:
        command += ["--features", ",".join(f"dstack-cli/{c}" for c in clouds)]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, check=True, text=True)
    BIN.mkdir(exist_ok=True)
    copied = set()
    for line in done.stdout.splitlines():
        message = json.loads(line)
        executable = message.get("executable")
        if message.get("reason") == "compiler-artifact" and executable:
            target = BIN / Path(executable).name
            shutil.copy2(executable, target)
            target.chmod(0o755)
            copied.add(target.name)
    missing = {"dstack", "dstack-agent"} - copied
    if missing:
        raise RuntimeError(f"cargo did not build {', '.join(sorted(missing))}")


def _extension_features() -> None:
    """Passes the cloud features on to maturin's build of the extension."""
    clouds = _clouds()
    if clouds:
        args = os.environ.get("MATURIN_PEP517_ARGS", "")
        os.environ["MATURIN_PEP517_ARGS"] = f"{args} --features {','.join(clouds)}".strip()


def build_wheel(
    wheel_directory: str,
    config_settings: Optional[Mapping[str, Any]] = None,
    metadata_directory: Optional[str] = None,
) -> str:
    _build_binaries(config_settings)
    _extension_features()
    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(
    wheel_directory: str,
    config_settings: Optional[Mapping[str, Any]] = None,
    metadata_directory: Optional[str] = None,
) -> str:
    _build_binaries(config_settings)
    _extension_features()
    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)
