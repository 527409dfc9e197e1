"""SSH fleets from Python: a real sshd host in a network namespace (needs root, iproute2 and
openssh-server, which .ci/run installs); apply, run a task there with its port forwarded while
attached, delete."""

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from dstack.api import BackendType, Client, Fleet, RunStatus, Task
from dstack.errors import ConfigurationError


def sh(command: str) -> None:
    subprocess.run(["sh", "-c", command], check=True)


@pytest.fixture()
def ssh_host(tmp_path: Path) -> Iterator[Tuple[str, Path]]:
    """One namespace host with sshd; yields its address and the client key it accepts."""
    ns = f"dsrpy{os.getpid() % 100000}"
    veth = f"v{ns}"
    base = 4 * (os.getpid() % 60)
    addr = f"10.231.253.{base + 2}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for name in ("host_key", "client_key"):
        sh(f"ssh-keygen -q -t ed25519 -N '' -f {tmp_path / name}")
    (tmp_path / "authorized_keys").write_text((tmp_path / "client_key.pub").read_text())
    sh(
        f"ip netns add {ns} && ip link add {veth} type veth peer name {veth}n && "
        f"ip link set {veth}n netns {ns} && ip addr add 10.231.253.{base + 1}/30 dev {veth} && "
        f"ip link set {veth} up && ip netns exec {ns} ip addr add {addr}/30 dev {veth}n && "
        f"ip netns exec {ns} ip link set {veth}n up && ip netns exec {ns} ip link set lo up && "
        # Logins on the host start plain: this machine's ~/.bashrc may run slow tools (pyenv's
        # rehash); masked in the host's own mount namespace only.
        f"mkdir -p /run/sshd && ip netns exec {ns} sh -c '"
        f'[ -f "$HOME/.bashrc" ] && mount --bind /dev/null "$HOME/.bashrc"; '
        f"exec /usr/sbin/sshd -f /dev/null "
        f"-h {tmp_path}/host_key -o ListenAddress={addr} -o PidFile={tmp_path}/sshd.pid "
        f"-o AuthorizedKeysFile={tmp_path}/authorized_keys -o StrictModes=no -o UsePAM=no "
        f"-o PermitRootLogin=prohibit-password'"
    )
    try:
        yield addr, tmp_path / "client_key"
    finally:
        sh(
            f"for p in $(ip netns pids {ns}); do kill -9 $p; done; ip netns del {ns}; "
            f"ip link del {veth} 2>/dev/null; true"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_fleet_apply_run_with_forwarded_port_and_delete(
    client: Client, ssh_host: Tuple[str, Path], tmp_path: Path
) -> None:
    addr, key = ssh_host
    name = f"pyfleet-{os.getpid()}"
    steps: List[Tuple[str, str]] = []
    fleet = client.fleets.apply_configuration(
        Fleet(name=name, ssh_config={"user": "root", "identity_file": str(key), "hosts": [addr]}),
        progress=lambda instance, step: steps.append((instance, step)),
    )
    assert fleet["status"] == "active", steps
    (instance,) = fleet["instances"]
    assert instance["status"] == "idle" and instance["address"] == addr
    assert (instance["name"], "ready") in steps
    assert client.fleets.get(name) is not None

    try:
        check_run_on_fleet(client, name, addr, tmp_path)
    finally:
        deleted = client.fleets.delete(name, force=True)
    assert deleted == {instance["name"]: None}
    assert client.fleets.get(name)["status"] == "terminated"  # type: ignore[index]


def check_run_on_fleet(client: Client, name: str, addr: str, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "index.html").write_text("from the fleet host")
    task = Task(
        fleets=[name],
        ports=[port],
        working_dir=str(tmp_path),
        commands=[f"exec python3 -m http.server {port} --bind 127.0.0.1"],
        resources={"cpu": "1..", "memory": "0.1GB.."},
    )
    run = client.runs.apply_configuration(task)
    assert run.attach()
    assert run.ports == {port: port}
    assert run.backend == BackendType.REMOTE and run.hostname == addr
    body = ""
    deadline = time.monotonic() + 20
    while "from the fleet host" not in body:
        assert time.monotonic() < deadline, "no answer through the forwarded port"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2) as r:
                body = r.read().decode()
        except OSError:
            time.sleep(0.2)
    run.stop(abort=True)
    assert run.ports is None  # stopping detaches
    assert run.wait(timeout=30).status == RunStatus.TERMINATED


def test_fleet_errors_are_clear(client: Client) -> None:
    with pytest.raises(ConfigurationError, match="hosts"):
        Fleet(name="bad", ssh_config={"user": "root"})
    from dstack.errors import DstackError

    with pytest.raises(DstackError, match="identity_file"):
        client.fleets.apply_configuration(
            Fleet(name="nokey", ssh_config={"user": "root", "hosts": ["10.231.253.1"]})
        )
