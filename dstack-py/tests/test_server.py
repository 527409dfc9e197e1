"""The home's `dstack server` as the Python client meets it: started on demand, and found
(or started) again when it was killed, with nothing lost and nothing run twice."""

import json
import os
import signal
import time
from pathlib import Path
from typing import List

from dstack.api import Client, Resources, RunStatus, Task

from conftest import kill_agent


def lines(path: Path) -> List[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def test_a_killed_server_comes_back_and_every_trial_of_a_sweep_runs_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ran = tmp_path / "ran"
    client = Client.from_config(home=home)
    try:
        task = Task(
            commands=[f'echo "$i" >> {ran}; sleep 0.05'],
            resources=Resources(cpu="1..", memory="0.1GB.."),
        )
        sweep = client.runs.sweep(task, {"i": list(range(100))}, max_parallel=2, name="killed")
        deadline = time.monotonic() + 60
        while len(lines(ran)) < 10:
            assert time.monotonic() < deadline, "the sweep did not start"
            time.sleep(0.05)
        first = json.loads((home / "server" / "server.json").read_text())["pid"]
        os.kill(first, signal.SIGKILL)
        sweep.wait(timeout=300, progress=False)
        assert all(run.status == RunStatus.DONE for run in sweep.runs)
        assert sorted(int(i) for i in lines(ran)) == list(range(100))
        second = json.loads((home / "server" / "server.json").read_text())["pid"]
        assert second != first
    finally:
        kill_agent(home)
