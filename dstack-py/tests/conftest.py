"""Fixtures: one temporary `DSTACK_HOME` per test session (its agent is killed at the end),
and a client of its server (started on demand). Everything runs for real: the engine, SQLite, the agent and the
jobs' processes."""

import json
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

import pytest

from dstack.api import Client


def kill_agent(home: Path) -> None:
    """Kills the home's agent and server (they would exit on their own a moment after the
    home is removed)."""
    pids = []
    try:
        pids.append(int((home / "agent" / "agent.pid").read_text().strip()))
    except (OSError, ValueError):
        pass
    try:
        pids.append(int(json.loads((home / "server" / "server.json").read_text())["pid"]))
    except (OSError, ValueError, KeyError):
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("dstack-home")
    os.environ["DSTACK_HOME"] = str(path)
    yield path
    kill_agent(path)


@pytest.fixture(scope="session")
def client(home: Path) -> Client:
    return Client.from_config(home=home)


@pytest.fixture()
def python() -> str:
    """The interpreter running the tests (jobs use it for Python one-liners)."""
    return sys.executable

