"""The asyncio client: `AsyncClient` mirrors `Client`, with awaitable methods and logs as an
async iterator. Work runs on the extension's tokio runtime; cancelling the awaiting task
cancels the Rust future. Needs an event loop with `add_reader` (the default on Unix)."""

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, List, Mapping, Optional, Tuple, Union

from dstack._client import Run
from dstack._records import ConfigurationData, ConfigurationLike, RunPlan, RunStatus, configuration_data, open_raw
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

    async def attach(self, *args: Any, **kwargs: Any) -> bool:  # type: ignore[override]
        """Waits until the run is running (or has finished); `False` if it finished
        unsuccessfully (see `Run.attach`)."""
        raw = self._raw
        self._snapshot = await _native(raw.wait_async(None, True))
        self._attached = not (self.status.is_finished() and self.status != RunStatus.DONE)
        if self._attached and not self.status.is_finished() and self._forward is None:
            self._forward = self._raw.forward_ports()
        return self._attached

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

    def logs(self, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:  # type: ignore[override]
        """The job's output as an async iterator of bytes (following when attached)."""
        return _AsyncLogs(self._raw.logs(follow=self._attached))


class _AsyncLogs:
    def __init__(self, raw: "RawLogs") -> None:
        self._raw = raw

    def __aiter__(self) -> "_AsyncLogs":
        return self

    async def __anext__(self) -> bytes:
        raw = self._raw
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
        self, configuration: ConfigurationLike, repo: Optional[Repo] = None, **_: Any
    ) -> RunPlan:
        """Where `configuration` would run."""
        data, client_dir = await self._with_repo(repo, configuration_data(configuration))
        raw = self._raw
        plan = await _native(raw.plan_async(data))
        return RunPlan(plan, data, client_dir=client_dir)

    async def apply_plan(
        self, run_plan: RunPlan, repo: Optional[Repo] = None, reserve_ports: bool = True
    ) -> AsyncRun:
        """Submits a planned run (in `repo`, else in the plan's)."""
        data, client_dir = run_plan._submitted, run_plan._client_dir
        if repo is not None:
            data, client_dir = await self._with_repo(repo, data)
        raw = self._raw
        run = await _native(
            raw.apply_async(data, configuration_path=run_plan.configuration_path, client_dir=client_dir)
        )
        return AsyncRun(run)

    async def apply_configuration(
        self,
        configuration: ConfigurationLike,
        repo: Optional[Repo] = None,
        configuration_path: Optional[str] = None,
        *,
        name: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        **_: Any,
    ) -> AsyncRun:
        """Submits a run of `configuration` (see `RunCollection.apply_configuration`)."""
        data, client_dir = await self._with_repo(repo, configuration_data(configuration))
        raw = self._raw
        env_dict = None if env is None else dict(env)
        run = await _native(raw.apply_async(data, name, env_dict, configuration_path, client_dir))
        return AsyncRun(run)

    async def get(self, run_name: str) -> Optional[AsyncRun]:
        """The current run with this name, or `None`."""
        raw = self._raw.get(run_name)
        return None if raw is None else AsyncRun(raw)

    async def list(self, all: bool = False, limit: Optional[int] = None) -> List[AsyncRun]:
        """Runs, newest first: unfinished ones only unless `all`."""
        names = [r["name"] for r in self._raw.list(all, limit)]
        return [AsyncRun(raw) for raw in self._raw.handles(names)]


class AsyncClient:
    """The asyncio twin of `dstack.Client`."""

    def __init__(self, raw: "RawClient") -> None:
        from dstack._client import FleetCollection, VolumeCollection

        self._raw = raw
        self.runs = AsyncRunCollection(raw)
        self.repos = RepoCollection(raw.home)
        self.fleets = FleetCollection(raw)
        self.volumes = VolumeCollection(raw)

    @staticmethod
    def from_config(*, home: Union[str, "os.PathLike[str]", None] = None) -> "AsyncClient":
        """The embedded client of `home` (default `$DSTACK_HOME` or `~/.dstack`)."""
        return AsyncClient(open_raw(home))
