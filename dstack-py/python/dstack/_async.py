"""The asyncio client: `AsyncClient` mirrors `Client`, with awaitable methods and logs as an
async iterator. Work runs on the extension's tokio runtime; cancelling the awaiting task
cancels the Rust future. Needs an event loop with `add_reader` (the default on Unix)."""

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from dstack._client import Run, listed_names
from dstack._local import PathLike, before_submit, public_key
from dstack._records import (
    ConfigurationData,
    ConfigurationLike,
    RunPlan,
    configuration_data,
    no_offer_variants,
)
from dstack._repos import Repo, RepoCollection, with_repo
from dstack.errors import WaitTimeoutError

if TYPE_CHECKING:
    import os

    from dstack._native import RawClient, RawLogs, RawRun, RawTask

__all__ = ["AsyncClient", "AsyncRun", "AsyncRunCollection"]


async def _native(task: "RawTask") -> Any:
    """Awaits a native task: its pipe becomes readable when it ends (runtime threads never take
    the GIL); its result is then collected on the loop's thread. Cancelling the awaiting
    asyncio task cancels the Rust future."""
    loop = asyncio.get_running_loop()
    future: "asyncio.Future[None]" = loop.create_future()
    fd = task.fileno()

    def ready() -> None:
        loop.remove_reader(fd)
        if not future.done():
            future.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await future
    except asyncio.CancelledError:
        loop.remove_reader(fd)
        task.cancel()
        raise
    return task.result()


class AsyncRun(Run):
    """A run, with awaitable `wait`, `stop`, `refresh`, `attach`, `get_metrics` and async
    `logs()`. Properties read the state of the last refresh."""

    async def refresh(self) -> "AsyncRun":  # type: ignore[override]
        """Reads the run's current state."""
        self._snapshot = self._raw.snapshot()
        return self

    async def wait(self, timeout: Optional[float] = None) -> "AsyncRun":  # type: ignore[override]
        """Waits until the run has finished; `WaitTimeoutError` after `timeout` seconds."""
        raw = self._raw
        snapshot = await _native(raw.wait_async(timeout))
        if snapshot is None:
            raise WaitTimeoutError(f"run {self.name} did not finish within {timeout}s")
        self._snapshot = snapshot
        return self

    async def attach(  # type: ignore[override]
        self,
        ssh_identity_file: Optional[PathLike] = None,
        bind_address: Optional[str] = None,
        ports_overrides: Optional[Sequence[Any]] = None,
        replica_num: Optional[int] = None,
        job_num: int = 0,
    ) -> bool:
        """Waits until the run is running (or has finished) and forwards the job's ports;
        `False` if it finished unsuccessfully (see `Run.attach`)."""
        overrides, bind = self._prepare_attach(ssh_identity_file, bind_address, ports_overrides)
        raw = self._raw
        self._snapshot = await _native(raw.wait_async(None, True))
        return self._finish_attach(replica_num, job_num, overrides, bind)

    async def stop(self, abort: bool = False) -> None:  # type: ignore[override]
        """Stops the run and detaches (see `Run.stop`)."""
        raw = self._raw
        self._snapshot = await _native(raw.stop_async(abort))
        self.detach()

    async def get_metrics(self) -> List[Dict[str, Any]]:
        """The values the job reported (see `Run.metrics`)."""
        raw = self._raw
        metrics: List[Dict[str, Any]] = await _native(raw.metrics_async())
        return metrics

    def logs(  # type: ignore[override]
        self,
        start_time: Optional[datetime] = None,
        diagnose: bool = False,
        replica_num: Optional[int] = None,
        job_num: int = 0,
    ) -> AsyncIterator[bytes]:
        """The job's output as an async iterator of bytes (following when attached; see
        `Run.logs`)."""
        return _AsyncLogs(self._logs(start_time, diagnose, replica_num, job_num))


class _AsyncLogs:
    def __init__(self, raw: Union["RawLogs", List[bytes]]) -> None:
        self._raw = raw

    def __aiter__(self) -> "_AsyncLogs":
        return self

    async def __anext__(self) -> bytes:
        raw = self._raw
        if isinstance(raw, list):
            # Read already (a diagnosis, or nothing: no such job).
            if not raw:
                raise StopAsyncIteration
            return raw.pop(0)
        chunk: bytes = await _native(raw.next_async())
        return chunk


class AsyncRunCollection:
    """`client.runs` of an `AsyncClient`."""

    def __init__(self, raw: "RawClient") -> None:
        self._raw = raw
        self._repos = RepoCollection(raw.home)

    async def _with_repo(
        self, repo: Optional[Repo], data: ConfigurationData
    ) -> Tuple[ConfigurationData, Optional[str]]:
        """`data` with `repo` added as its own (see `RunCollection._with_repo`), prepared off
        the event loop (a clone takes a while)."""
        if repo is None:
            return data, None
        directory = await asyncio.get_running_loop().run_in_executor(None, self._repos.directory, repo)
        return with_repo(data, directory), directory

    async def get_run_plan(
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
        """Where `configuration` would run (see `RunCollection.get_run_plan`)."""
        no_offer_variants(full_offers, unallocated_resources)
        key = public_key(ssh_identity_file, ssh_key_pub)
        data, client_dir = await self._with_repo(repo, configuration_data(configuration, profile))
        raw = self._raw
        plan = await _native(raw.plan_async(data))
        return RunPlan(plan, data, configuration_path, client_dir, max_offers, key)

    async def apply_plan(
        self, run_plan: RunPlan, repo: Optional[Repo] = None, reserve_ports: bool = True
    ) -> AsyncRun:
        """Submits a planned run (see `RunCollection.apply_plan`)."""
        data, client_dir = run_plan._submitted, run_plan._client_dir
        if repo is not None:
            data, client_dir = await self._with_repo(repo, data)
        before_submit(self._raw.home, run_plan.configuration, reserve_ports, run_plan._ssh_key_pub)
        raw = self._raw
        run = await _native(
            raw.apply_async(data, configuration_path=run_plan.configuration_path, client_dir=client_dir)
        )
        return AsyncRun(run, home=raw.home)

    async def apply_configuration(
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
    ) -> AsyncRun:
        """Submits a run of `configuration` (see `RunCollection.apply_configuration`)."""
        from dstack._native import validate

        key = public_key(ssh_identity_file, ssh_key_pub)
        data, client_dir = await self._with_repo(repo, configuration_data(configuration, profile))
        before_submit(self._raw.home, validate(data), reserve_ports, key)
        raw = self._raw
        env_dict = None if env is None else dict(env)
        run = await _native(raw.apply_async(data, name, env_dict, configuration_path, client_dir))
        return AsyncRun(run, home=raw.home)

    async def get(self, run_name: str) -> Optional[AsyncRun]:
        """The current run with this name, or `None`."""
        raw = self._raw.get(run_name)
        return None if raw is None else AsyncRun(raw, home=self._raw.home)

    async def list(self, all: bool = False, limit: Optional[int] = None) -> List[AsyncRun]:
        """Runs, newest first (see `RunCollection.list`)."""
        names = listed_names(self._raw, all, limit)
        return [AsyncRun(raw, home=self._raw.home) for raw in self._raw.handles(names)]


class AsyncClient:
    """The asyncio twin of `dstack.Client`."""

    def __init__(self, raw: "RawClient", project_name: str = "main", remote: bool = False) -> None:
        from dstack._client import BackendCollection, FleetCollection, VolumeCollection

        self._raw = raw
        self.project = project_name
        self.runs = AsyncRunCollection(raw)
        self.repos = RepoCollection(raw.home)
        self.backends = BackendCollection(raw, remote)
        self.fleets = FleetCollection(raw)
        self.volumes = VolumeCollection(raw)

    @staticmethod
    def from_config(
        project_name: Optional[str] = None,
        server_url: Optional[str] = None,
        user_token: Optional[str] = None,
        ssh_identity_file: Optional[PathLike] = None,
        *,
        home: Union[str, "os.PathLike[str]", None] = None,
    ) -> "AsyncClient":
        """A client of the server of `home` (default `$DSTACK_HOME` or `~/.dstack`) or of
        `server_url` (see `Client.from_config`)."""
        from dstack._client import Client

        client = Client.from_config(project_name, server_url, user_token, ssh_identity_file, home=home)
        return AsyncClient(client._raw, client.project, remote=server_url is not None)
