"""The synchronous client: `Client`, its `runs`, `fleets` and `volumes`, and `Run`.

Every call that waits releases the GIL and honours Ctrl-C (`KeyboardInterrupt` within
~50 ms); interrupting a wait or a log stream leaves the run running.
"""

import os
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    NoReturn,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from dstack._config import BackendType, backend_type
from dstack._local import (
    PathLike,
    accept_ssh_key,
    before_submit,
    bind_address_of,
    diagnosis,
    port_overrides,
    public_key,
)
from dstack._records import (
    ConfigurationData,
    ConfigurationLike,
    RunPlan,
    RunStatus,
    configuration_data,
    home_dir,
    html_table,
    no_offer_variants,
    open_raw,
    timestamp,
)
from dstack._repos import Repo, RepoCollection, with_repo
from dstack.errors import ClientError, NotSupportedError, WaitTimeoutError

if TYPE_CHECKING:
    from dstack._native import RawClient, RawForward, RawLogs, RawRun
    from dstack._sweep import Params, Sweep
    from dstack._config import Task

__all__ = [
    "Backend",
    "BackendCollection",
    "Client",
    "FleetCollection",
    "Run",
    "RunCollection",
    "ServiceModel",
    "VolumeCollection",
]


class ServiceModel:
    """The model a service serves (`model:`): its `name`, and `url`, the base of its
    OpenAI-compatible API on the server's proxy."""

    def __init__(self, name: str, url: str) -> None:
        self._name = name
        self._url = url

    @property
    def name(self) -> str:
        """The model name clients ask for."""
        return self._name

    @property
    def url(self) -> str:
        """The base URL of the model's OpenAI-compatible API."""
        return self._url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ServiceModel) and (self.name, self.url) == (other.name, other.url)

    def __hash__(self) -> int:
        return hash((self.name, self.url))

    def __repr__(self) -> str:
        return f"<ServiceModel '{self.name}'>"


def listed_names(raw: "RawClient", all: bool, limit: Optional[int]) -> List[str]:
    """The names `runs.list(all, limit)` lists, newest first, as dstack picks them: with
    `all` or a `limit`, the latest runs of any status (at most `limit`); otherwise the
    unfinished ones, or the latest run when none is unfinished."""
    only_active = not all and limit is None
    records = raw.list(not only_active, limit)
    if only_active and not records:
        records = raw.list(True, 1)
    return [r["name"] for r in records]


def _since_ms(start_time: Optional[datetime]) -> Optional[int]:
    """`start_time` in Unix ms (a naive datetime is this machine's local time)."""
    return None if start_time is None else max(0, int(start_time.timestamp() * 1000))


class Run:
    """A submitted run. Its fields are read when the run is created or `refresh()`ed."""

    def __init__(
        self,
        raw: "RawRun",
        snapshot: Optional[Dict[str, Any]] = None,
        home: Optional[PathLike] = None,
    ) -> None:
        self._raw = raw
        self._home = home_dir(home)
        self._attached = False
        # The `(replica_num, job_num)` attached to.
        self._slot: Optional[Tuple[int, int]] = None
        self._forward: Optional["RawForward"] = None
        self._snapshot: Dict[str, Any] = snapshot or raw.snapshot()

    @property
    def name(self) -> str:
        """The run name."""
        return self._raw.name

    @property
    def id(self) -> str:
        """The run id."""
        return self._raw.id

    @property
    def status(self) -> RunStatus:
        """The status as of the last refresh."""
        return RunStatus(self._snapshot["run"]["status"])

    @property
    def status_message(self) -> Optional[str]:
        """Why the run is in its status (e.g. the reason it waits), when known."""
        message: Optional[str] = self._snapshot["run"].get("status_message")
        return message

    @property
    def termination_reason(self) -> Optional[str]:
        """Why the run ended."""
        reason: Optional[str] = self._snapshot["run"].get("termination_reason")
        return reason

    @property
    def submitted_at(self) -> datetime:
        """When the run was submitted."""
        at = timestamp(self._snapshot["run"]["submitted_at_ms"])
        assert at is not None
        return at

    @property
    def next_triggered_at(self) -> Optional[datetime]:
        """A scheduled run (`schedule`): when it is next due to start or, once started, when
        that start was due (as dstack's field); `None` for a run without a schedule."""
        return timestamp(self._snapshot["run"].get("next_triggered_at_ms"))

    @property
    def configuration(self) -> Dict[str, Any]:
        """The normalized configuration the run was submitted with."""
        configuration: Dict[str, Any] = self._snapshot["run"]["spec"]["configuration"]
        return configuration

    @property
    def jobs(self) -> List[Dict[str, Any]]:
        """Every job submission of the run (records, oldest first)."""
        jobs: List[Dict[str, Any]] = self._snapshot["jobs"]
        return jobs

    @property
    def exit_status(self) -> Optional[int]:
        """The exit status of the latest submission of the run's job, once it exited."""
        job = self._latest_job()
        return None if job is None else job.get("exit_status")

    @property
    def duration(self) -> Optional[float]:
        """Seconds the latest job has been running (or ran), once it started."""
        job = self._latest_job()
        if job is None or job.get("started_at_ms") is None:
            return None
        end = job.get("finished_at_ms") or int(datetime.now().timestamp() * 1000)
        return max(0.0, float(end - job["started_at_ms"]) / 1000)

    def _instance(self) -> Optional[Dict[str, Any]]:
        job = self._latest_job()
        instance_id = None if job is None else job.get("instance_id")
        instances: List[Dict[str, Any]] = self._snapshot.get("instances", [])
        return next((i for i in instances if i["id"] == instance_id), None)

    @property
    def backend(self) -> Optional[BackendType]:
        """The backend the latest job runs on (`LOCAL`, `REMOTE` for SSH fleets, a cloud),
        once placed."""
        instance = self._instance()
        return None if instance is None else backend_type(str(instance["backend"]))

    @property
    def hostname(self) -> Optional[str]:
        """The address of the host the job runs on, once placed."""
        instance = self._instance()
        if instance is None:
            return None
        return str(instance.get("address") or "127.0.0.1")

    @property
    def ports(self) -> Optional[Dict[int, int]]:
        """While attached: each configured port of the job mapped to the port of this machine
        where it is reachable (forwarded over SSH for jobs on fleet hosts)."""
        if not self._attached or self._forward is None:
            return None
        return {there: here for here, there in self._forward.ports}

    @property
    def service_url(self) -> Optional[str]:
        """A service's URL on the server's proxy (`<server>/proxy/services/<project>/<run>/`);
        `None` for other runs. Requests need `Authorization: Bearer <token>` unless the
        service has `auth: false`."""
        service = self._snapshot.get("service")
        return service["url"] if service else None

    @property
    def service_model(self) -> Optional[ServiceModel]:
        """The model a service serves (`model:`), with the base URL of its OpenAI-compatible
        API; `None` otherwise."""
        service = self._snapshot.get("service")
        if not service or not service.get("model"):
            return None
        return ServiceModel(service["model"], service["model_base_url"])

    @property
    def metrics(self) -> List[Dict[str, Any]]:
        """The values the job reported: each JSON object it appended as a line to the file
        named by `$DSTACK_METRICS_FILE`, in order."""
        metrics: List[Dict[str, Any]] = self._raw.metrics()
        return metrics

    @property
    def artifacts(self) -> List[Dict[str, Any]]:
        """The run's artifact files (`path`, `hash`, `size`, `mode`): saved now while it runs,
        final once it has ended (a workflow's `artifacts`)."""
        files: List[Dict[str, Any]] = self._raw.artifacts()["files"]
        return files

    def download_artifacts(
        self, path: Optional[str] = None, output_dir: Union[str, "os.PathLike[str]"] = "."
    ) -> List[str]:
        """Downloads the run's artifacts (those at or below `path`, or all) into `output_dir`
        at their paths; returns the paths written."""
        return self._raw.download_artifacts(output_dir, path)

    @property
    def ide_link(self) -> Optional[str]:
        """The link that opens a running dev environment in its IDE (`ide:`), e.g.
        `vscode://vscode-remote/ssh-remote+<run>/<working dir>`; `None` for other runs, a dev
        environment without `ide`, or one not running yet. Read now."""
        return self._raw.ide_link()

    def _latest_job(self) -> Optional[Dict[str, Any]]:
        jobs = [j for j in self.jobs if j["job_num"] == 0 and j["replica_num"] == 0]
        return max(jobs, key=lambda j: j["submission_num"]) if jobs else None

    def _find_slot(self, replica_num: Optional[int], job_num: int) -> Optional[Tuple[int, int]]:
        """`(replica_num, job_num)` of job `job_num` in replica `replica_num`, or, for
        `None`, in the lowest-numbered running replica, else the lowest-numbered one (as
        dstack picks); `None` if the run has no such job."""
        latest: Dict[int, Dict[str, Any]] = {}
        for job in self.jobs:
            if job["job_num"] != job_num:
                continue
            seen = latest.get(job["replica_num"])
            if seen is None or job["submission_num"] > seen["submission_num"]:
                latest[job["replica_num"]] = job
        if replica_num is not None:
            return (replica_num, job_num) if replica_num in latest else None
        running = [r for r, j in latest.items() if j["status"] == "running"]
        replicas = running or list(latest)
        return (min(replicas), job_num) if replicas else None

    def refresh(self) -> "Run":
        """Reads the run's current state."""
        self._snapshot = self._raw.snapshot()
        return self

    def wait(self, timeout: Optional[float] = None) -> "Run":
        """Waits until the run has finished and returns it. Raises `WaitTimeoutError` after
        `timeout` seconds (the run keeps going)."""
        snapshot = self._raw.wait(timeout)
        if snapshot is None:
            raise WaitTimeoutError(f"run {self.name} did not finish within {timeout}s")
        self._snapshot = snapshot
        return self

    def _prepare_attach(
        self,
        ssh_identity_file: Optional[PathLike],
        bind_address: Optional[str],
        ports_overrides: Optional[Sequence[Any]],
    ) -> Tuple[List[Tuple[int, int]], str]:
        """Checks `attach`'s arguments before waiting: the port overrides and the address
        to listen on."""
        bind = bind_address_of(bind_address)
        overrides = port_overrides(ports_overrides)
        key = public_key(ssh_identity_file, None)
        if key is not None:
            accept_ssh_key(self._home, key)
        return overrides, bind

    def _finish_attach(
        self, replica_num: Optional[int], job_num: int, overrides: List[Tuple[int, int]], bind: str
    ) -> bool:
        """Once the run is running or finished: picks the job and forwards its ports."""
        if self.status.is_finished() and self.status != RunStatus.DONE:
            return False
        slot = self._find_slot(replica_num, job_num)
        if slot is None:
            replica = "<any>" if replica_num is None else replica_num
            raise ClientError(f"run {self.name} has no job {job_num} in replica {replica}")
        if self._slot is not None and self._slot != slot:
            raise ClientError(f"run {self.name} is attached to another job: detach first")
        if not self.status.is_finished() and self._forward is None:
            self._forward = self._raw.forward_ports(slot[1], slot[0], overrides, bind)
        self._slot = slot
        self._attached = True
        return True

    def attach(
        self,
        ssh_identity_file: Optional[PathLike] = None,
        bind_address: Optional[str] = None,
        ports_overrides: Optional[Sequence[Any]] = None,
        replica_num: Optional[int] = None,
        job_num: int = 0,
    ) -> bool:
        """Waits until the run is running (or has finished) and forwards the ports of job
        `job_num` of replica `replica_num` (default: a running replica) to `bind_address`
        here (default `127.0.0.1`); afterwards `logs()` follows that job's output until the
        run ends. Returns `False` if the run finished unsuccessfully.

        Ports of local jobs are already reachable on this machine (`ports` maps them; they
        listen where the job binds them); `ports_overrides` (`PortMapping`s,
        `"LOCAL:REMOTE"` strings or ports) moves ports to other local ones.
        `ssh_identity_file` (a private key with its `.pub`, or a public key) is also accepted
        by `ssh <run>`. Raises `PortUsedError` if a local port is taken."""
        overrides, bind = self._prepare_attach(ssh_identity_file, bind_address, ports_overrides)
        snapshot = self._raw.wait(None, running=True)
        assert snapshot is not None  # no timeout
        self._snapshot = snapshot
        return self._finish_attach(replica_num, job_num, overrides, bind)

    def detach(self) -> None:
        """Stops following and forwarding: `logs()` then returns the output written so far."""
        self._attached = False
        self._slot = None
        if self._forward is not None:
            self._forward.close()
            self._forward = None

    def _logs(
        self,
        start_time: Optional[datetime],
        diagnose: bool,
        replica_num: Optional[int],
        job_num: int,
    ) -> Union[List[bytes], "RawLogs"]:
        attached = self._attached and self._slot is not None
        if attached and replica_num is None and job_num == 0:
            slot: Optional[Tuple[int, int]] = self._slot
        else:
            slot = self._find_slot(replica_num, job_num)
        if slot is None:
            return []
        if diagnose:
            self._snapshot = self._raw.snapshot()  # the record as it is now
            jobs = [j for j in self.jobs if (j["replica_num"], j["job_num"]) == slot]
            return [diagnosis(jobs, self._snapshot.get("instances", [])).encode()]
        follow = attached and slot == self._slot
        return self._raw.logs(follow, slot[0], slot[1], _since_ms(start_time))

    def logs(
        self,
        start_time: Optional[datetime] = None,
        diagnose: bool = False,
        replica_num: Optional[int] = None,
        job_num: int = 0,
    ) -> Iterator[bytes]:
        """The output of job `job_num` of replica `replica_num` (default: the job attached
        to, else a running replica, else the first) as chunks of bytes, written at
        `start_time` or later: while attached to it, everything until the run ends (across
        retries); otherwise what it wrote so far. Nothing if there is no such job.

        `diagnose=True` gives the engine's current record of the job's submissions
        (statuses, times, instance, exit status, reasons) instead: jobs here have no separate
        runner log."""
        return iter(self._logs(start_time, diagnose, replica_num, job_num))

    def stop(self, abort: bool = False) -> None:
        """Stops the run: SIGTERM, then SIGKILL after the grace period (at once with
        `abort`). Also detaches."""
        self._snapshot = self._raw.stop(abort)
        self.detach()

    def __repr__(self) -> str:
        return f"<Run {self.name} {self.status.value}>"

    def _repr_html_(self) -> str:
        exit_status = self.exit_status
        row = [
            self.name,
            self.status.value,
            "" if exit_status is None else exit_status,
            self.termination_reason or "",
            self.submitted_at.strftime("%Y-%m-%d %H:%M:%S"),
        ]
        return html_table(["run", "status", "exit", "reason", "submitted"], [row])


class TagCollection:
    """Tags: names for a finished run's artifacts (`WORKFLOW:TAG`) or uploaded files
    (`:TAG`), which a workflow's `depends-on` puts into later runs."""

    def __init__(self, raw: "RawClient") -> None:
        self._raw = raw

    def add(
        self,
        name: str,
        run: Optional[Union[str, "Run"]] = None,
        artifacts: Optional[List[Union[str, "os.PathLike[str]"]]] = None,
    ) -> Dict[str, Any]:
        """Tags the artifacts of finished `run`, or uploads the local `artifacts` paths
        (files or directories) as `:name`; returns the tag."""
        if (run is None) == (artifacts is None):
            raise ValueError("tag a run or upload artifacts: pass one of run= and artifacts=")
        run_name = run.name if isinstance(run, Run) else run
        return self._raw.tags_add(name, run_name, list(artifacts or []))

    def list(self) -> List[Dict[str, Any]]:
        """Every tag, with the manifest of the files it names."""
        return self._raw.tags_list()

    def delete(self, name: str) -> None:
        """Deletes a tag (`TAG`, `WORKFLOW:TAG` or `:TAG`); the run's artifacts stay."""
        self._raw.tags_delete(name)


class RunCollection:
    """The runs of a client: plan, apply, get, list, and sweeps. A run given a `repo` starts
    its jobs, on every backend, in a copy of it (see `dstack.api.RemoteRepo`)."""

    def __init__(self, raw: "RawClient") -> None:
        self._raw = raw
        self._repos = RepoCollection(raw.home)

    def _with_repo(
        self, repo: Optional[Repo], data: ConfigurationData
    ) -> Tuple[ConfigurationData, Optional[str]]:
        """`data` with `repo` prepared and added as its own (see `with_repo`), and the
        directory relative paths are taken from."""
        if repo is None:
            return data, None
        directory = self._repos.directory(repo)
        return with_repo(data, directory), directory

    def get_run_plan(
        self,
        configuration: ConfigurationLike,
        repo: Optional[Repo] = None,
        profile: Any = None,
        configuration_path: Optional[str] = None,
        ssh_identity_file: Optional[PathLike] = None,
        ssh_key_pub: Optional[str] = None,
        max_offers: Optional[int] = None,
        full_offers: bool = False,
        unallocated_resources: bool = False,
        for_offers_only: bool = False,
    ) -> RunPlan:
        """Where `configuration` would run (at most `max_offers` offers), without running it.

        `ssh_identity_file` (a public key, or a private key with its `.pub` or from which
        `ssh-keygen` derives it) or `ssh_key_pub` names a key that `ssh <run>` accepts once
        the plan is applied (mutually exclusive; the project key and `~/.ssh/id_*` are
        accepted anyway). `profile` (a mapping of profile parameters, or dstack's `Profile`)
        sets those the configuration leaves unset. Planning never reserves anything here, so
        `for_offers_only` needs nothing more. `full_offers` and `unallocated_resources` are
        not supported (`NotSupportedError`)."""
        no_offer_variants(full_offers, unallocated_resources)
        key = public_key(ssh_identity_file, ssh_key_pub)
        data, client_dir = self._with_repo(repo, configuration_data(configuration, profile))
        return RunPlan(self._raw.plan(data), data, configuration_path, client_dir, max_offers, key)

    def apply_plan(self, run_plan: RunPlan, repo: Optional[Repo] = None, reserve_ports: bool = True) -> Run:
        """Submits a planned run (in `repo`, else in the plan's). With `reserve_ports`, raises
        `PortUsedError` first if a local port the run's `ports` take when attached is in use
        here."""
        data, client_dir = run_plan._submitted, run_plan._client_dir
        if repo is not None:
            data, client_dir = self._with_repo(repo, data)
        before_submit(self._raw.home, run_plan.configuration, reserve_ports, run_plan._ssh_key_pub)
        raw = self._raw.apply(data, configuration_path=run_plan.configuration_path, client_dir=client_dir)
        return Run(raw, home=self._raw.home)

    def apply_configuration(
        self,
        configuration: ConfigurationLike,
        repo: Optional[Repo] = None,
        profile: Any = None,
        configuration_path: Optional[str] = None,
        reserve_ports: bool = True,
        ssh_identity_file: Optional[PathLike] = None,
        ssh_key_pub: Optional[str] = None,
        *,
        name: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> Run:
        """Submits a run of `configuration` (a `Task`/`Service`/`DevEnvironment`, a dict, or
        YAML text) and returns it; `name` and `env` override the configuration's. The other
        arguments are those of `get_run_plan` and `apply_plan`."""
        from dstack._native import validate

        key = public_key(ssh_identity_file, ssh_key_pub)
        data, client_dir = self._with_repo(repo, configuration_data(configuration, profile))
        before_submit(self._raw.home, validate(data), reserve_ports, key)
        raw = self._raw.apply(
            data,
            name=name,
            env=None if env is None else dict(env),
            configuration_path=configuration_path,
            client_dir=client_dir,
        )
        return Run(raw, home=self._raw.home)

    def get(self, run_name: str) -> Optional[Run]:
        """The current run with this name, or `None`."""
        raw = self._raw.get(run_name)
        return None if raw is None else Run(raw, home=self._raw.home)

    def list(self, all: bool = False, limit: Optional[int] = None) -> List[Run]:
        """Runs, newest first (see `listed_names`)."""
        return [Run(raw, home=self._raw.home) for raw in self._raw.handles(listed_names(self._raw, all, limit))]

    def sweep(
        self,
        task: "Task",
        params: "Params",
        max_parallel: Optional[int] = None,
        name: Optional[str] = None,
    ) -> "Sweep":
        """Runs `task` once per parameter combination: `params` is a grid
        (`{"lr": [1e-3, 1e-4], "bs": [32, 64]}`) or a list of dicts. Each trial's env holds
        its parameters, `DSTACK_SWEEP_INDEX` and `DSTACK_SWEEP_SIZE`; at most `max_parallel`
        trials run at once."""
        from dstack._sweep import Sweep

        return Sweep.submit(self._raw, task, params, max_parallel, name)


class FleetCollection:
    """The fleets of a client: the implicit `local` fleet (this machine) and SSH fleets."""

    def __init__(self, raw: "RawClient") -> None:
        self._raw = raw

    def apply_configuration(
        self,
        configuration: ConfigurationLike,
        progress: Optional[Callable[[str, str], None]] = None,
    ) -> Dict[str, Any]:
        """Applies a fleet (`Fleet(ssh_config=...)`, a dict, or YAML text): connects to each
        host over SSH, installs and starts the agent, and returns the fleet record with its
        `instances`. A host that fails does so alone: its instance is `terminated` with the
        reason in `status_message`. `progress(instance, step)` hears each step."""
        applied = self._raw.apply_fleet(configuration_data(configuration), progress)
        return dict(applied["fleet"], instances=applied["instances"])

    def delete(self, name: str, force: bool = False) -> Dict[str, Optional[str]]:
        """Deletes a fleet: stops its hosts' agents and removes what was installed; refuses
        while jobs run on it unless `force`. Returns each instance's cleanup error (or None)."""
        return dict(self._raw.delete_fleet(name, force))

    def list(self) -> List[Dict[str, Any]]:
        """Fleets as records, each with its `instances`."""
        return [dict(f["fleet"], instances=f["instances"]) for f in self._raw.fleets()]

    def get(self, name: str) -> Optional[Dict[str, Any]]:
        """A fleet by name, or `None`."""
        return next((f for f in self.list() if f["name"] == name), None)


class VolumeCollection:
    """The network volumes of a client (`type: volume` on a cloud backend configured in
    `$DSTACK_HOME/config.yml`)."""

    def __init__(self, raw: "RawClient") -> None:
        self._raw = raw

    def apply_configuration(self, configuration: ConfigurationLike) -> Dict[str, Any]:
        """Creates the volume (or registers the existing `volume_id`) and returns its record:
        `status` is `active`, or `failed` with the reason in `status_message`."""
        volume: Dict[str, Any] = self._raw.apply_volume(configuration_data(configuration))
        return volume

    def delete(self, name: str) -> Dict[str, Any]:
        """Deletes a volume attached nowhere (a registered one is only forgotten)."""
        volume: Dict[str, Any] = self._raw.delete_volume(name)
        return volume

    def list(self) -> List[Dict[str, Any]]:
        """Volumes (not deleted) as records."""
        volumes: List[Dict[str, Any]] = self._raw.volumes()
        return volumes

    def get(self, name: str) -> Optional[Dict[str, Any]]:
        """A volume by name, or `None`."""
        return next((v for v in self.list() if v["name"] == name), None)


class Backend:
    """A backend of the client's project."""

    def __init__(self, backend_type: BackendType) -> None:
        self._type = backend_type

    @property
    def name(self) -> str:
        """The backend's type, as dstack names it (`local`, `aws`, `gcp`)."""
        return self._type.value

    @property
    def type(self) -> BackendType:
        """The backend's type."""
        return self._type

    def __repr__(self) -> str:
        return f"<Backend '{self.name}'>"


class BackendCollection:
    """`client.backends`: the backends runs of the project can use."""

    def __init__(self, raw: "RawClient", remote: bool = False) -> None:
        self._raw = raw
        self._remote = remote

    def list(self) -> List[Backend]:
        """This machine (`local`), then each cloud backend the server's configuration
        (`$DSTACK_HOME/server/config.yml`) lists. SSH fleets are not listed (`client.fleets`).
        Not supported for a server given by `server_url` (its configuration is not here)."""
        if self._remote:
            raise NotSupportedError(
                "client.backends of a server given by server_url is not supported yet: "
                "its configuration is on that server"
            )
        return [Backend(backend_type(name)) for name in self._raw.backends()]


class Client:
    """A dstack client: of the `dstack server` of `$DSTACK_HOME` (default `~/.dstack`),
    started in the background when none answers and supervising runs after this process
    exits, or of the server at `server_url`."""

    def __init__(self, raw: "RawClient", project_name: str = "main", remote: bool = False) -> None:
        self._raw = raw
        self.project = project_name
        self.runs = RunCollection(raw)
        self.repos = RepoCollection(raw.home)
        self.backends = BackendCollection(raw, remote)
        self.fleets = FleetCollection(raw)
        self.volumes = VolumeCollection(raw)
        self.tags = TagCollection(raw)

    @property
    def client(self) -> NoReturn:
        """dstack's low-level `APIClient` is not supported: use `runs`, `fleets`, `volumes`,
        `backends`, or the REST API of `dstack server`."""
        raise NotSupportedError(
            "client.client (dstack's low-level APIClient) is not supported: use client.runs, "
            "client.fleets, client.volumes and client.backends, or the REST API of `dstack server`"
        )

    @staticmethod
    def from_config(
        project_name: Optional[str] = None,
        server_url: Optional[str] = None,
        user_token: Optional[str] = None,
        ssh_identity_file: Optional[PathLike] = None,
        *,
        home: Union[str, "os.PathLike[str]", None] = None,
    ) -> "Client":
        """A client of the server of `home` (default `$DSTACK_HOME` or `~/.dstack`): the
        project `project_name` (default: `$DSTACK_PROJECT`, else the default project of
        `home/config.yml`), whose local server is started when none answers; or, with
        `server_url` and `user_token`, of that server. `ssh <run>` also accepts the key of
        `ssh_identity_file` (see `RunCollection.get_run_plan`)."""
        if (server_url is None) != (user_token is None):
            raise ClientError("server_url and user_token go together")
        key = public_key(ssh_identity_file, None)
        raw = open_raw(home, server_url, user_token, project_name)
        if key is not None:
            accept_ssh_key(raw.home, key)
        return Client(raw, project_name or "main", remote=server_url is not None)

    @property
    def home(self) -> str:
        """The state directory."""
        return str(self._raw.home)

    def __repr__(self) -> str:
        return f"<Client home={self.home}>"
