"""Every name of dstack's `dstack.api` (spec §6.2) is here, and every documented argument is
either honoured or refused with `NotSupportedError` and a message: none is accepted and
ignored. Each test calls the arguments of one entry point on real runs of the local backend."""

import inspect
import re
import socket
import subprocess
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

import dstack.api
from dstack._async import AsyncRunCollection
from dstack._local import bind_address_of, port_overrides
from dstack.api import (
    CPU,
    GPU,
    AsyncClient,
    AsyncRun,
    Backend,
    BackendCollection,
    BackendType,
    Client,
    ClientError,
    ComputeCapability,
    DevEnvironment,
    Disk,
    Memory,
    OpenAIChatModel,
    PortUsedError,
    Range,
    RegistryAuth,
    RemoteRepo,
    RepoCollection,
    Resources,
    Run,
    RunCollection,
    RunStatus,
    Scaling,
    Service,
    ServiceModel,
    Task,
    TGIChatModel,
    VirtualRepo,
)
from dstack.errors import ConfigurationError, NotSupportedError

# The names spec §6.2 lists as exports of `dstack.api`, plus dstack's `Backend` and
# `ServiceModel` (what `client.backends.list()` and `Run.service_model` return).
SPEC_NAMES = [
    "Client", "RunCollection", "RepoCollection", "BackendCollection", "Run", "RunStatus",
    "Task", "Service", "DevEnvironment", "Resources", "CPU", "GPU", "Disk", "Memory", "Range",
    "ComputeCapability", "Scaling", "RegistryAuth", "RemoteRepo", "VirtualRepo", "BackendType",
    "OpenAIChatModel", "TGIChatModel", "PortUsedError", "ClientError", "Backend", "ServiceModel",
]  # fmt: skip

# Each documented entry point and its documented parameters, in dstack's order.
SIGNATURES: Dict[Callable[..., Any], List[str]] = {
    Client.from_config: ["project_name", "server_url", "user_token"],
    RunCollection.get_run_plan: [
        "self", "configuration", "repo", "profile", "configuration_path", "ssh_identity_file",
        "ssh_key_pub", "max_offers", "full_offers", "unallocated_resources", "for_offers_only",
    ],
    RunCollection.apply_plan: ["self", "run_plan", "repo", "reserve_ports"],
    RunCollection.apply_configuration: [
        "self", "configuration", "repo", "profile", "configuration_path", "reserve_ports",
        "ssh_identity_file", "ssh_key_pub",
    ],
    RunCollection.list: ["self", "all", "limit"],
    RunCollection.get: ["self", "run_name"],
    Run.refresh: ["self"],
    Run.stop: ["self", "abort"],
    Run.attach: ["self", "ssh_identity_file", "bind_address", "ports_overrides", "replica_num", "job_num"],
    Run.detach: ["self"],
    Run.logs: ["self", "start_time", "diagnose", "replica_num", "job_num"],
    RepoCollection.init: ["self", "repo", "git_identity_file", "oauth_token", "creds"],
    RepoCollection.load: ["self", "repo_dir", "local", "init", "git_identity_file", "oauth_token"],
    RepoCollection.is_initialized: ["self", "repo", "by_user"],
    RepoCollection.get: ["self", "repo_id", "with_creds"],
    RemoteRepo.from_dir: ["repo_dir"],
    RemoteRepo.from_url: ["repo_url", "repo_branch", "repo_hash"],
    VirtualRepo.__init__: ["self", "repo_id"],
    VirtualRepo.add_file: ["self", "path", "content"],
    VirtualRepo.add_file_from_package: ["self", "package", "path"],
    BackendCollection.list: ["self"],
}  # fmt: skip

# The asyncio twins take the same arguments.
ASYNC_TWINS: Dict[Callable[..., Any], str] = {
    RunCollection.get_run_plan: "get_run_plan",
    RunCollection.apply_plan: "apply_plan",
    RunCollection.apply_configuration: "apply_configuration",
    RunCollection.list: "list",
    RunCollection.get: "get",
}


class DumpedProfile:
    """The shape of dstack's pydantic `Profile`: its fields come from `model_dump()`."""

    def __init__(self, fields: Dict[str, Any]) -> None:
        self._fields = fields

    def model_dump(self) -> Dict[str, Any]:
        return dict(self._fields)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def taken_port() -> Iterator[int]:
    """A port of this machine something listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private key with its `.pub` beside it."""
    path = tmp_path_factory.mktemp("keys") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def accepted_keys(client: Client) -> List[str]:
    path = Path(client.home, "ssh", "authorized_keys")
    return path.read_text().splitlines() if path.exists() else []


def public_of(key: Path) -> str:
    return Path(f"{key}.pub").read_text().strip()


def new_key(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def test_every_spec_name_is_exported() -> None:
    for name in SPEC_NAMES:
        assert name in dstack.api.__all__, name
        assert getattr(dstack.api, name) is not None


def test_every_documented_argument_is_a_parameter_and_none_is_swallowed() -> None:
    for function, documented in SIGNATURES.items():
        parameters = inspect.signature(function).parameters
        assert list(parameters)[: len(documented)] == documented, function.__qualname__
        kinds = {p.kind for p in parameters.values()}
        # No `*args`/`**kwargs` that would take (and drop) arguments of another name.
        assert not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}, function
    for sync, name in ASYNC_TWINS.items():
        twin = inspect.signature(getattr(AsyncRunCollection, name)).parameters
        assert list(twin) == list(inspect.signature(sync).parameters), name
    async_from_config = inspect.signature(AsyncClient.from_config).parameters
    assert list(async_from_config) == list(inspect.signature(Client.from_config).parameters)
    for name in ("attach", "logs"):
        twin = inspect.signature(getattr(AsyncRun, name)).parameters
        assert list(twin) == list(inspect.signature(getattr(Run, name)).parameters), name


def test_configuration_classes_take_dstack_arguments() -> None:
    resources = Resources(
        cpu=CPU(min=2),
        memory=Range[Memory](min=Memory.parse("1GB")),
        gpu=GPU(name=["A100"], memory="40GB..", count=Range[int](min=1, max=2), compute_capability=ComputeCapability((8, 0))),
        disk=Disk(size="100GB.."),
    )  # fmt: skip
    task = Task(
        name="surface",
        image="python:3.12",
        registry_auth=RegistryAuth(username="u", password="p"),
        commands=["true"],
        resources=resources,
        backends=[BackendType.AWS],
    )
    data = task.dict()
    assert data["registry_auth"] == {"username": "u", "password": "p"}
    assert data["resources"]["gpu"]["name"] == ["A100"] and data["backends"] == ["aws"]
    assert data["resources"]["gpu"]["compute_capability"] == [8, 0]
    assert ComputeCapability.validate("7.5") == (7, 5) and str(ComputeCapability((9, 0))) == "9.0"
    with pytest.raises(ConfigurationError, match="compute capability"):
        ComputeCapability.validate("seven")
    service = Service(
        port=8000,
        commands=["serve"],
        replicas=Range[int](min=1, max=2),
        scaling=Scaling(metric="rps", target=10),
        model=OpenAIChatModel(name="m"),
    )
    assert service.dict()["scaling"]["target"] == 10
    assert Service(port=80, commands=["x"], model=TGIChatModel(name="m")).dict()["model"]["format"] == "tgi"
    assert DevEnvironment(ide="vscode").dict()["ide"] == "vscode"


def test_client_from_config_and_its_properties(client: Client, key_pair: Path) -> None:
    assert Client.from_config(project_name="main").project == "main"
    with pytest.raises(ClientError, match="project other"):
        Client.from_config(project_name="other")
    with pytest.raises(ClientError, match="go together"):
        Client.from_config(server_url="http://127.0.0.1:1")
    config = Path(client.home, "config.yml").read_text()
    url = re.search(r'url: "?([^"\s]+)"?', config).group(1)  # type: ignore[union-attr]
    token = re.search(r'token: "([^"]+)"', config).group(1)  # type: ignore[union-attr]
    remote = Client.from_config(project_name="main", server_url=url, user_token=token)
    assert isinstance(remote.runs.list(all=True), list)
    with pytest.raises(NotSupportedError, match="server_url"):
        remote.backends.list()

    # The deprecated `ssh_identity_file` of dstack's client: `ssh <run>` accepts its key.
    Client.from_config(ssh_identity_file=str(key_pair))
    assert public_of(key_pair) in accepted_keys(client)

    assert isinstance(client.runs, RunCollection) and isinstance(client.repos, RepoCollection)
    backends = client.backends.list()
    assert [b.name for b in backends] == ["local"]
    assert isinstance(backends[0], Backend) and backends[0].type is BackendType.LOCAL
    with pytest.raises(NotSupportedError, match="low-level APIClient"):
        client.client


def test_get_run_plan_arguments(client: Client, tmp_path: Path) -> None:
    task = Task(name="surface-plan", commands=["cat hello.txt"])
    repo = VirtualRepo()
    repo.add_file("hello.txt", "from the repo\n")
    # A profile sets the parameters the configuration leaves unset (as a mapping, dstack's
    # pydantic `Profile`, with YAML text); the configuration's own win.
    profile = {"name": "p", "default": True, "max_duration": "1h", "spot_policy": "on-demand", "pool_name": None}
    planned = client.runs.get_run_plan(Task(commands=["true"], max_duration="2h"), profile=profile).configuration
    assert planned["max_duration"] == 7200 and planned["spot_policy"] == "on-demand"
    yaml_plan = client.runs.get_run_plan("type: task\ncommands: [\"true\"]\n", profile=DumpedProfile(profile))
    assert yaml_plan.configuration["max_duration"] == 3600
    with pytest.raises(ConfigurationError, match="profile.colour"):
        client.runs.get_run_plan(task, profile={"colour": "red"})
    with pytest.raises(ConfigurationError, match="profile="):
        client.runs.get_run_plan(task, profile=object())
    with pytest.raises(NotSupportedError, match="full_offers"):
        client.runs.get_run_plan(task, full_offers=True)
    with pytest.raises(NotSupportedError, match="unallocated_resources"):
        client.runs.get_run_plan(task, unallocated_resources=True)
    key = new_key(tmp_path, "plan_key")
    with pytest.raises(ConfigurationError, match="mutually exclusive"):
        client.runs.get_run_plan(task, ssh_identity_file=str(key), ssh_key_pub=public_of(key))
    with pytest.raises(ConfigurationError, match="Unable to read"):
        client.runs.get_run_plan(task, ssh_identity_file=str(tmp_path / "missing"))

    # for_offers_only: a plan has no side effects.
    offers_only = client.runs.get_run_plan(task, for_offers_only=True, max_offers=1)
    assert len(offers_only.offers) == 1
    # Offers are dstack's typed records in `job_plans`.
    (offer,) = offers_only.job_plans[0].offers
    assert offer.backend is BackendType.LOCAL and offer.region == "local" and offer.price == 0.0
    assert offer.availability == offers_only.offers[0]["availability"] in ("idle", "busy")
    assert offer.instance.name == offers_only.offers[0]["instance_type"]
    resources = offer.instance.resources
    assert resources.cpus >= 1 and resources.memory_mib > 0 and resources.disk.size_mib > 0
    assert resources.spot is False and resources.gpus == [] and offers_only.job_plans[0].max_price == 0.0
    assert client.runs.get("surface-plan") is None

    plan = client.runs.get_run_plan(task, repo=repo, configuration_path="surface.dstack.yml", ssh_identity_file=str(key))
    assert plan.configuration_path == "surface.dstack.yml"
    assert public_of(key) not in accepted_keys(client)  # only once applied
    run = client.runs.apply_plan(plan).wait(timeout=60)
    assert public_of(key) in accepted_keys(client)
    assert b"".join(run.logs()) == b"from the repo\n"
    assert run.refresh()._snapshot["run"]["spec"]["configuration_path"] == "surface.dstack.yml"

    # A public key file, and a key given as text.
    other = new_key(tmp_path, "other_key")
    client.runs.apply_plan(client.runs.get_run_plan(task, ssh_identity_file=f"{other}.pub")).wait(timeout=60)
    assert public_of(other) in accepted_keys(client)
    text_key = public_of(new_key(tmp_path, "text_key"))
    client.runs.apply_plan(client.runs.get_run_plan(task, ssh_key_pub=text_key)).wait(timeout=60)
    assert text_key in accepted_keys(client)
    # A private key without its `.pub`: the public half is derived; an encrypted one is refused.
    bare = new_key(tmp_path, "bare_key")
    public = public_of(bare)
    Path(f"{bare}.pub").unlink()
    client.runs.apply_plan(client.runs.get_run_plan(task, ssh_identity_file=bare)).wait(timeout=60)
    assert public in accepted_keys(client)
    locked = tmp_path / "locked_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True)
    Path(f"{locked}.pub").unlink()
    with pytest.raises(ConfigurationError, match="invalid SSH key"):
        client.runs.get_run_plan(task, ssh_identity_file=locked)
    with pytest.raises(ConfigurationError, match="one SSH public key"):
        client.runs.get_run_plan(task, ssh_key_pub="not a key")


def test_apply_plan_and_apply_configuration_reserve_ports(client: Client, taken_port: int, tmp_path: Path) -> None:
    task = Task(commands=["true"], ports=[taken_port])
    with pytest.raises(PortUsedError, match=str(taken_port)):
        client.runs.apply_plan(client.runs.get_run_plan(task))
    with pytest.raises(PortUsedError, match=str(taken_port)):
        client.runs.apply_configuration(task)
    # Not reserving: submitted anyway (the job itself then finds its port taken).
    assert client.runs.apply_plan(client.runs.get_run_plan(task), reserve_ports=False).wait(timeout=60).name
    assert client.runs.apply_configuration(task, reserve_ports=False).wait(timeout=60).name

    repo = VirtualRepo()
    repo.add_file("f.txt", "applied\n")
    key = new_key(tmp_path, "apply_key")
    profiled = client.runs.apply_configuration(Task(commands=["true"]), profile={"max_duration": "1h"})
    assert profiled.configuration["max_duration"] == 3600
    run = client.runs.apply_configuration(
        Task(commands=["cat f.txt"]),
        repo=repo,
        configuration_path="x.dstack.yml",
        ssh_identity_file=str(key),
    ).wait(timeout=60)
    assert b"".join(run.logs()) == b"applied\n" and public_of(key) in accepted_keys(client)
    text_key = public_of(new_key(tmp_path, "apply_text_key"))
    client.runs.apply_configuration(Task(commands=["true"]), ssh_key_pub=text_key).wait(timeout=60)
    assert text_key in accepted_keys(client)


def test_list_and_get(client: Client) -> None:
    done = client.runs.apply_configuration(Task(name="surface-list", commands=["true"])).wait(timeout=60)
    assert [r.name for r in client.runs.list(all=True, limit=1)] == ["surface-list"]
    # A limit lists the latest runs of any status, as dstack's does.
    assert [r.name for r in client.runs.list(limit=1)] == ["surface-list"]
    running = client.runs.apply_configuration(Task(name="surface-active", commands=["sleep 30"]))
    try:
        assert "surface-list" not in [r.name for r in client.runs.list()]
        assert "surface-active" in [r.name for r in client.runs.list()]
    finally:
        running.stop(abort=True)
    running.wait(timeout=30)
    got = client.runs.get("surface-list")
    assert got is not None and got.status == RunStatus.DONE and got.id == done.id
    assert client.runs.get("no-such-run") is None


def test_run_properties_attach_and_detach(client: Client, python: str, tmp_path: Path) -> None:
    remote, local = free_port(), free_port()
    task = Task(commands=[f"{python} -m http.server {remote} --bind 127.0.0.1"], ports=[remote])
    run = client.runs.apply_configuration(task)
    try:
        assert isinstance(run, Run) and run.ports is None
        with pytest.raises(ConfigurationError, match="bind_address"):
            run.attach(bind_address="nowhere")
        with pytest.raises(ConfigurationError, match="invalid port mapping"):
            run.attach(ports_overrides=["x:y"])
        with pytest.raises(ClientError, match="no job 0 in replica 3"):
            run.attach(replica_num=3)
        key = new_key(tmp_path, "attach_key")
        assert run.attach(
            ssh_identity_file=str(key), bind_address="0.0.0.0", ports_overrides=[PortMapping(local, remote)], replica_num=0, job_num=0
        )  # fmt: skip
        assert public_of(key) in accepted_keys(client)
        assert run.ports == {remote: local}
        assert run.status == RunStatus.RUNNING and run.backend is BackendType.LOCAL
        assert run.hostname == "127.0.0.1"
        assert run.service_url is None and run.service_model is None
        deadline = time.monotonic() + 30
        while True:
            try:
                # 127.0.0.2 reaches only a port bound to every address (0.0.0.0).
                with urllib.request.urlopen(f"http://127.0.0.2:{local}/", timeout=5) as answer:
                    assert answer.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert run.attach() is True  # attached already: the same forwarding
        assert run.ports == {remote: local}
        run.detach()
        assert run.ports is None
        with socket.socket() as s:  # the local port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
            deadline = time.monotonic() + 10
            while True:
                try:
                    s.bind(("127.0.0.1", local))
                    break
                except OSError:  # the forwarding task ends a moment after detach
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            s.listen()
            with pytest.raises(PortUsedError, match=str(local)):
                run.attach(ports_overrides=[f"{local}:{remote}"])
    finally:
        run.stop(abort=True)
    assert run.refresh().status in (RunStatus.TERMINATING, RunStatus.TERMINATED)
    assert run.wait(timeout=30).status == RunStatus.TERMINATED


class PortMapping:
    """The shape of dstack's `PortMapping` (its class is internal to dstack)."""

    def __init__(self, local_port: int, container_port: int) -> None:
        self.local_port = local_port
        self.container_port = container_port


def test_port_overrides_take_dstack_mappings_text_and_ports() -> None:
    assert port_overrides([PortMapping(8080, 80), "9000:90", "7000", 6000]) == [
        (8080, 80),
        (9000, 90),
        (7000, 7000),
        (6000, 6000),
    ]
    with pytest.raises(ConfigurationError, match="1-65535"):
        port_overrides(["70000:80"])
    assert bind_address_of(None) == bind_address_of("localhost") == "127.0.0.1"
    assert bind_address_of("::") == "::"


def test_logs_arguments(client: Client) -> None:
    run = client.runs.apply_configuration(Task(commands=["echo first", "sleep 2", "echo second"])).wait(timeout=60)
    assert b"".join(run.logs()) == b"first\nsecond\n"
    job = run.jobs[0]
    middle = datetime.fromtimestamp(job["started_at_ms"] / 1000 + 1, tz=timezone.utc)
    assert b"".join(run.logs(start_time=middle)) == b"second\n"
    assert b"".join(run.logs(start_time=middle + timedelta(days=1))) == b""
    assert b"".join(run.logs(replica_num=0, job_num=0)) == b"first\nsecond\n"
    assert list(run.logs(replica_num=1)) == [] and list(run.logs(job_num=1)) == []
    diagnosis = b"".join(run.logs(diagnose=True)).decode()
    assert diagnosis.startswith("replica 0 job 0 submission 0: done\n")
    assert "exit status: 0" in diagnosis and "instance: " in diagnosis

    # Job 1 of a 2-node task (refused here: no cluster fleet) is a job of its own.
    nodes = client.runs.apply_configuration(Task(commands=["true"], nodes=2)).wait(timeout=60)
    assert nodes.status == RunStatus.FAILED
    assert b"".join(nodes.logs(diagnose=True, job_num=1)).decode().startswith("replica 0 job 1 submission 0:")
    assert nodes.attach(job_num=1) is False


async def _async_surface(home: Path, taken: int) -> None:
    client = AsyncClient.from_config(project_name="main", home=home)
    assert client.project == "main" and [b.name for b in client.backends.list()] == ["local"]
    task = Task(commands=["echo async"])
    with pytest.raises(NotSupportedError, match="full_offers"):
        await client.runs.get_run_plan(task, full_offers=True)
    with pytest.raises(ConfigurationError, match="profile.colour"):
        await client.runs.apply_configuration(task, profile={"colour": "red"})
    profiled = await client.runs.get_run_plan(task, profile={"max_duration": "1h"})
    assert profiled.configuration["max_duration"] == 3600
    with pytest.raises(PortUsedError):
        await client.runs.apply_configuration(Task(commands=["true"], ports=[taken]))
    plan = await client.runs.get_run_plan(task, max_offers=1)
    run = await (await client.runs.apply_plan(plan)).wait(timeout=60)
    assert [c async for c in run.logs(diagnose=True)][0].startswith(b"replica 0 job 0 submission 0: done")
    assert b"".join([c async for c in run.logs(job_num=0)]) == b"async\n"
    assert [c async for c in run.logs(job_num=1)] == []
    with pytest.raises(ConfigurationError, match="bind_address"):
        await run.attach(bind_address="::x")


def test_async_client_takes_the_same_arguments(home: Path, taken_port: int) -> None:
    import asyncio

    asyncio.run(_async_surface(home, taken_port))


def test_repo_arguments(client: Client, tmp_path: Path) -> None:
    url_repo = RemoteRepo.from_url("https://example.com/r.git", repo_branch="dev", repo_hash="abc123")
    assert (url_repo.repo_url, url_repo.repo_branch, url_repo.repo_hash) == ("https://example.com/r.git", "dev", "abc123")
    directory = RemoteRepo.from_dir(tmp_path)
    assert client.repos.is_initialized(directory)
    loaded = client.repos.load(tmp_path)
    assert isinstance(loaded, RemoteRepo) and loaded.local_repo_dir == str(tmp_path)
    virtual = VirtualRepo(repo_id="surface")
    virtual.add_file_from_package("dstack", "py.typed")
    assert virtual.repo_id == "surface" and "py.typed" in virtual.files
    assert not client.repos.is_initialized(virtual)
    client.repos.init(virtual)
    assert client.repos.is_initialized(virtual) and client.repos.is_initialized(virtual, by_user=True)
    with pytest.raises(NotSupportedError, match="oauth_token"):
        client.repos.init(virtual, oauth_token="t")
    with pytest.raises(NotSupportedError, match="creds"):
        client.repos.init(virtual, creds={"protocol": "https"})
    with pytest.raises(NotSupportedError, match="oauth_token"):
        client.repos.load(tmp_path, oauth_token="t")
    with pytest.raises(NotSupportedError, match="repos.get"):
        client.repos.get("surface", with_creds=True)


def test_a_service_model_is_typed() -> None:
    model = ServiceModel("m", "http://x/v1")
    assert (model.name, model.url) == ("m", "http://x/v1") and model == ServiceModel("m", "http://x/v1")
