"""The `dstack` and `dstack-agent` executables shipped inside the package (`dstack/bin/`),
and the `dstack` console script that runs the first."""

import os
import sys
from pathlib import Path
from typing import List, Optional

_BIN = Path(__file__).resolve().parent / "bin"


def find(name: str) -> Optional[Path]:
    """A bundled executable (`dstack` or `dstack-agent`), made executable if the installer
    dropped the bit; `None` when it is not bundled."""
    path = _BIN / name
    if not path.is_file():
        return None
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | 0o111)
        except OSError:
            return None
    return path


def server() -> Optional[Path]:
    """The `dstack` binary that runs the state directory's server when a client finds none:
    `$DSTACK_SERVER_BIN`, else the bundled one (else `None`: the native side looks on
    `PATH`)."""
    configured = os.environ.get("DSTACK_SERVER_BIN")
    if configured:
        return Path(configured)
    return find("dstack")


def main(argv: Optional[List[str]] = None) -> None:
    """The `dstack` command: runs the bundled CLI binary in place of this process."""
    exe = find("dstack")
    if exe is None:
        sys.exit("dstack: the CLI binary is missing from this installation (dstack/bin/dstack)")
    args = [str(exe), *(sys.argv[1:] if argv is None else argv)]
    os.execv(args[0], args)
