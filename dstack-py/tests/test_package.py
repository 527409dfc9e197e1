"""The installed package: import, lazy names, the bundled CLI and agent, the error tree."""

import subprocess
import sys
from pathlib import Path

import pytest

import dstack
from dstack import errors


def test_import_is_lazy_and_light() -> None:
    code = "import sys, dstack; print('dstack._native' in sys.modules, 'json' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_public_names_resolve() -> None:
    for name in dstack.__all__:
        assert getattr(dstack, name) is not None
    with pytest.raises(AttributeError):
        dstack.no_such_name  # noqa: B018


def test_cli_and_agent_are_installed_with_the_package() -> None:
    bin_dir = Path(dstack.__file__).parent / "bin"
    for name in ("dstack", "dstack-agent"):
        assert (bin_dir / name).is_file()
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dstack"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "apply" in out.stdout and "ps" in out.stdout


def test_error_hierarchy() -> None:
    tree = {
        errors.ConfigurationError: errors.DstackError,
        errors.ResourceNotExistsError: errors.DstackError,
        errors.ResourceExistsError: errors.DstackError,
        errors.BackendError: errors.DstackError,
        errors.BackendAuthError: errors.BackendError,
        errors.NoCapacityError: errors.BackendError,
        errors.NotSupportedError: errors.BackendError,
        errors.WaitTimeoutError: errors.DstackError,
        errors.SSHError: errors.DstackError,
    }
    for child, parent in tree.items():
        assert issubclass(child, parent), child
    assert issubclass(errors.ConfigurationError, ValueError)
    assert not issubclass(errors.WaitTimeoutError, TimeoutError)
