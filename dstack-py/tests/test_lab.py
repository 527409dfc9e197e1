"""examples/lab.dstack.yml for real, with the `dstack` CLI of this package and the real
OpenSSH client: JupyterLab (installed in this virtualenv from PyPI: scripts/test-python.sh
does it) started by the dev environment's `init`, an `ssh <run>` login, `dstack attach`
forwarding the port, HTTP requests to JupyterLab through it, and the stop that ends
JupyterLab with the run.

`HOME` is a temporary directory: `dstack apply` adds its `Include` there, and `ssh` is given
that configuration with `-F` (OpenSSH reads the user configuration of the passwd entry, not
of `$HOME`)."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from conftest import kill_agent

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab.dstack.yml"
BIN = Path(sys.executable).parent
# Requests never go through a proxy of the environment.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` (connections of a closed one may
    linger in TIME_WAIT: servers bind with SO_REUSEADDR, so does this check)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for(what: str, check: Callable[[], bool], context: Callable[[], str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{context()}")
        time.sleep(0.1)


def get(url: str, token: Optional[str] = None) -> Tuple[int, bytes]:
    """Status and body of `GET url` (0 when nothing answers)."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"token {token}")
    try:
        with HTTP.open(request, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def test_jupyterlab_example_through_ssh_and_attach(tmp_path: Path) -> None:
    jupyter = BIN / "jupyter"
    version = subprocess.run(
        [str(jupyter), "lab", "--version"], capture_output=True, text=True
    ) if jupyter.exists() else None
    if version is None or version.returncode != 0:
        pytest.fail(
            f"JupyterLab is not installed in the test virtualenv {BIN.parent} "
            f"(`{BIN / 'python'} -m pip install jupyterlab`; scripts/test-python.sh installs it)"
        )
    ssh = shutil.which("ssh")
    assert ssh is not None, "the OpenSSH client `ssh` is needed"

    home, user, work = tmp_path / "home", tmp_path / "user", tmp_path / "work"
    for d in (home, user, work):
        d.mkdir()
    (work / "notes.txt").write_text("in the working directory\n")
    token = secrets.token_hex(16)
    env = dict(os.environ)
    env.update(
        DSTACK_HOME=str(home),
        HOME=str(user),
        JUPYTER_TOKEN=token,
        # The job gets the client's PATH: it finds this virtualenv's `jupyter`.
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(BIN.parent),
    )

    # The example as it is; on a machine where 8888 is taken, the same text on a free port.
    port, config = 8888, EXAMPLE
    if not port_is_free(port):
        port = free_port()
        text = EXAMPLE.read_text()
        moved = text.replace("\n  - 8888\n", f"\n  - {port}\n").replace("--port=8888", f"--port={port}")
        assert moved.count(str(port)) == 2, "the example's port is in `ports` and in `init`"
        config = tmp_path / "lab.dstack.yml"
        config.write_text(moved)

    def dstack(*args: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(
            [str(BIN / "dstack"), *args], env=env, cwd=work, capture_output=True, text=True, timeout=120
        )

    def context() -> str:
        server_log = home / "server" / "server.log"
        return (
            f"ps: {dstack('ps', '-a').stdout}\nlogs: {dstack('logs', 'lab').stdout}\n"
            f"server log: {server_log.read_text() if server_log.exists() else ''}"
        )

    def ssh_config() -> str:
        path = home / "ssh" / "config"
        return path.read_text() if path.exists() else ""

    def has_entry() -> bool:
        return any(line.split()[:2] == ["Host", "lab"] for line in ssh_config().splitlines())

    attach: Optional["subprocess.Popen[str]"] = None
    try:
        out = dstack("apply", "-f", str(config), "-d", "-y")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for("the run's SSH entry (the run running)", has_entry, context)

        # An SSH login lands in the job's world: its name, working directory, and PATH.
        ssh_args: List[str] = [
            ssh, "-F", str(user / ".ssh" / "config"), "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"
        ]
        login = subprocess.run(
            [*ssh_args, "lab", "echo $DSTACK_RUN_NAME; pwd -P; command -v jupyter"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
        assert login.returncode == 0, login.stderr
        assert login.stdout.splitlines() == ["lab", str(work.resolve()), str(jupyter)], login.stdout

        # `dstack attach` forwards the port (moved to a free one here) and prints the IDE link.
        here = free_port()
        attach = subprocess.Popen(
            [str(BIN / "dstack"), "attach", "lab", "-p", f"{here}:{port}"],
            env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        base = f"http://127.0.0.1:{here}"
        answers: Dict[str, Tuple[int, bytes]] = {}

        def jupyter_answers() -> bool:
            answers["api"] = get(f"{base}/api")
            return answers["api"][0] == 200

        wait_for(
            "JupyterLab through the forwarded port", jupyter_answers,
            lambda: f"last answer: {answers.get('api')}\n{context()}",
        )
        assert "version" in json.loads(answers["api"][1])
        # The token from the client's environment guards the rest; the root is the job's
        # working directory.
        assert get(f"{base}/api/contents")[0] == 403
        status, body = get(f"{base}/api/contents", token)
        assert status == 200, body
        assert "notes.txt" in [item["name"] for item in json.loads(body)["content"]]
        status, body = get(f"{base}/lab?token={token}")
        assert status == 200 and b"<title>JupyterLab</title>" in body, body[:500]

        attach.send_signal(signal.SIGINT)
        stdout, stderr = attach.communicate(timeout=30)
        attach = None
        assert f"Open in the IDE: vscode://vscode-remote/ssh-remote+lab{work.resolve()}" in stdout, stderr
        assert f"Port {port} of the job is reachable at localhost:{here}" in stderr, stderr

        # Stopping the run ends JupyterLab with it, and its SSH entry.
        out = dstack("stop", "lab", "-y")
        assert out.returncode == 0, out.stderr
        wait_for("the SSH entry's removal", lambda: not has_entry(), context)
        wait_for(
            f"JupyterLab's port {port} to close", lambda: port_is_free(port),
            lambda: f"port {port} still taken\n{context()}", timeout=30,
        )
        runs = json.loads(dstack("ps", "-a", "--json").stdout)
        assert [(r["run"]["name"], r["run"]["status"]) for r in runs] == [("lab", "terminated")]
    finally:
        if attach is not None:
            attach.kill()
            attach.wait()
        dstack("stop", "lab", "-x", "-y")
        kill_agent(home)
