"""What a client does on this machine for the arguments of dstack's API: the SSH keys that
`ssh <run>` accepts (`ssh_identity_file=`, `ssh_key_pub=`), the local ports a run needs
(`reserve_ports=`, `ports_overrides=`, `bind_address=`), and the record `logs(diagnose=True)`
prints."""

import errno
import fcntl
import ipaddress
import os
import shutil
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from dstack.errors import ConfigurationError, PortUsedError

__all__ = [
    "accept_ssh_key",
    "before_submit",
    "bind_address_of",
    "check_ports_free",
    "diagnosis",
    "port_overrides",
    "public_key",
    "run_ports",
]

PathLike = Union[str, "os.PathLike[str]"]



def public_key(ssh_identity_file: Optional[PathLike], ssh_key_pub: Optional[str]) -> Optional[str]:
    """The public key `ssh_identity_file` (a public key, or a private key whose public half is
    `PATH.pub` or derived with `ssh-keygen -y`) or `ssh_key_pub` names; `None` for neither."""
    if ssh_identity_file is not None and ssh_key_pub is not None:
        raise ConfigurationError("ssh_key_pub and ssh_identity_file are mutually exclusive")
    if ssh_key_pub is not None:
        return _one_key(ssh_key_pub, "ssh_key_pub")
    if ssh_identity_file is None:
        return None
    path = Path(ssh_identity_file).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"Unable to read the SSH key at {path}: {e}") from e
    if not text.lstrip().startswith("-----"):
        return _one_key(text, str(path))
    beside = Path(f"{path}.pub")
    if beside.is_file():
        return _one_key(beside.read_text(), str(beside))
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise ConfigurationError(f"{path} has no {beside.name} and ssh-keygen is not on PATH")
    # An empty passphrase: an encrypted key fails at once instead of prompting.
    derived = subprocess.run(
        [keygen, "-y", "-P", "", "-f", str(path)], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if derived.returncode != 0:
        raise ConfigurationError(f"Unsupported or invalid SSH key at {path}: {derived.stderr.strip()}")
    return _one_key(derived.stdout, str(path))


def _one_key(text: str, source: str) -> str:
    key = text.strip()
    parts = key.split()
    if "\n" in key or len(parts) < 2 or not (parts[0].startswith(("ssh-", "ecdsa-", "sk-"))):
        raise ConfigurationError(f"{source} does not hold one SSH public key")
    return key


def accept_ssh_key(home: PathLike, key: str) -> None:
    """Adds `key` to the keys `ssh <run>` sessions of `home`'s server accept
    (`ssh/authorized_keys`, as `dstack attach --ssh-identity` does)."""
    directory = Path(home) / "ssh"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "authorized_keys"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "r+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        if all(line.strip() != key for line in file.read().splitlines()):
            file.write(key + "\n")


def before_submit(
    home: PathLike, normalized: Dict[str, Any], reserve_ports: bool, ssh_key_pub: Optional[str]
) -> None:
    """Before a run of `normalized` (a validated configuration) is submitted: with
    `reserve_ports`, the local ports its `ports` take must be free (`PortUsedError`); `ssh
    <run>` accepts `ssh_key_pub`."""
    if reserve_ports:
        check_ports_free(run_ports(normalized))
    if ssh_key_pub is not None:
        accept_ssh_key(home, ssh_key_pub)


def bind_address_of(bind_address: Optional[str]) -> str:
    """The IP address forwarded ports listen on: `bind_address` (`localhost` is
    `127.0.0.1`), by default `127.0.0.1`."""
    if bind_address is None or bind_address == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(bind_address))
    except ValueError:
        raise ConfigurationError(
            f"bind_address={bind_address!r} is not an IP address of this machine (e.g. 127.0.0.1, 0.0.0.0, ::)"
        ) from None


def port_overrides(ports_overrides: Optional[Sequence[Any]]) -> List[Tuple[int, int]]:
    """`ports_overrides` as `(local, remote)` pairs: each a `PortMapping`-like object
    (`local_port`, `container_port`), `"LOCAL:REMOTE"`, or a port number (the same here)."""
    pairs = []
    for item in ports_overrides or ():
        if isinstance(item, bool):
            raise ConfigurationError(f"invalid port mapping {item!r}")
        if isinstance(item, int):
            pairs.append((item, item))
        elif isinstance(item, str):
            here, _, there = item.rpartition(":")
            try:
                pairs.append((int(here or there), int(there)))
            except ValueError:
                raise ConfigurationError(f"invalid port mapping {item!r}: expected LOCAL:REMOTE") from None
        elif hasattr(item, "container_port"):
            container_port = int(item.container_port)
            local_port = getattr(item, "local_port", None)
            pairs.append((container_port if local_port is None else int(local_port), container_port))
        else:
            raise ConfigurationError(
                f"invalid port mapping {item!r}: expected a PortMapping, 'LOCAL:REMOTE' or a port"
            )
    for local, remote in pairs:
        if not (0 < local < 65536 and 0 < remote < 65536):
            raise ConfigurationError(f"invalid port mapping {local}:{remote}: ports are 1-65535")
    return pairs


def run_ports(configuration: Dict[str, Any]) -> List[int]:
    """The ports of this machine a normalized task or dev environment configuration's
    `ports` take while attached (a service is reached through the server's proxy)."""
    if configuration.get("type") == "service":
        return []
    ports = configuration.get("ports") or []
    return [int(p.get("local_port") or p["container_port"]) for p in ports]


def check_ports_free(ports: Sequence[int]) -> None:
    """Raises `PortUsedError` if a port of `ports` is in use on this machine."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                raise PortUsedError(f"port {port} is already in use on this machine") from None


def _time(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def diagnosis(jobs: Sequence[Dict[str, Any]], instances: Sequence[Dict[str, Any]]) -> str:
    """The engine's record of one job's submissions (oldest first), as `dstack logs -d`
    prints it: there is no separate runner log here."""
    out = []
    for job in sorted(jobs, key=lambda j: j["submission_num"]):
        out.append(
            f"replica {job['replica_num']} job {job['job_num']} submission "
            f"{job['submission_num']}: {job['status']}"
        )
        out.append(f"  submitted: {_time(job.get('submitted_at_ms'))}")
        if job.get("started_at_ms") is not None:
            out.append(f"  started: {_time(job['started_at_ms'])}")
        if job.get("finished_at_ms") is not None:
            out.append(f"  finished: {_time(job['finished_at_ms'])}")
        instance_id = job.get("instance_id")
        if instance_id is None:
            out.append("  instance: none assigned")
        else:
            instance = next((i for i in instances if i["id"] == instance_id), None)
            name, backend = ("(gone)", "-") if instance is None else (instance["name"], instance["backend"])
            out.append(f"  instance: {name} ({backend}, {instance_id})")
        for key, label in (
            ("exit_status", "exit status"),
            ("termination_reason", "termination reason"),
            ("termination_message", "message"),
        ):
            if job.get(key) is not None:
                out.append(f"  {label}: {job[key]}")
    return "".join(line + "\n" for line in out)
