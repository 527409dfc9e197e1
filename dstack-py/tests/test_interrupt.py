"""Ctrl-C during a blocking call raises KeyboardInterrupt promptly and leaves the run running.
Each case runs in a child interpreter that receives a real SIGINT."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import signal, sys, time
# A shell that starts jobs in the background (`cmd &`) makes them ignore SIGINT, and Python
# then keeps it ignored; the test is about what Ctrl-C does with Python's own handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
from dstack.api import Client, Resources, Task
client = Client.from_config()
task = Task(commands=["echo started; sleep 60"], resources=Resources(cpu="1..", memory="0.1GB.."))
run = client.runs.apply_configuration(task)
run.attach()
try:
    print("ready", flush=True)
    if sys.argv[1] == "wait":
        run.wait()
    else:
        for chunk in run.logs():
            pass
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.stdin.readline()  # the parent measured; now check the run
    print(run.refresh().status.value, flush=True)
    run.stop(abort=True)
    print(run.wait(timeout=30).status.value, flush=True)
"""


@pytest.mark.parametrize("call", ["wait", "logs"])
def test_ctrl_c_interrupts_and_the_run_keeps_running(home: Path, call: str) -> None:
    stderr_path = home / "child.stderr"
    with stderr_path.open("w") as stderr, subprocess.Popen(
        [sys.executable, "-c", CHILD, call],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=dict(os.environ, DSTACK_HOME=str(home)),
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGINT)
        line = child.stdout.readline().strip()
        assert line == "interrupted", f"child said {line!r}; stderr:\n{stderr_path.read_text()}"
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "running"
        assert child.stdout.readline().strip() == "terminated"
        assert child.wait(timeout=30) == 0
