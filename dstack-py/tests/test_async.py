"""`dstack.AsyncClient`: the same operations as the sync client, awaitable; logs as an async
iterator; cancelling an awaiting task cancels the Rust side and leaves the run running."""

import asyncio
from pathlib import Path

import pytest

import dstack
from dstack.api import AsyncRun, RunStatus, Task
from dstack.errors import ResourceExistsError, WaitTimeoutError


def run_async(coro: "asyncio.Future[None] | object") -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_async_parity(home: Path) -> None:
    async def main() -> None:
        client = dstack.AsyncClient.from_config(home=home)
        plan = await client.runs.get_run_plan(Task(commands=["true"]))
        assert plan.offers
        run = await client.runs.apply_configuration(
            Task(commands=["echo one; sleep 0.2; echo two"]), name="async-run"
        )
        assert isinstance(run, AsyncRun)
        assert await run.attach() is True
        chunks = [chunk async for chunk in run.logs()]
        assert b"".join(chunks) == b"one\ntwo\n"
        await run.wait(timeout=60)
        assert run.status == RunStatus.DONE and run.exit_status == 0
        got = await client.runs.get("async-run")
        assert got is not None and got.id == run.id
        assert "async-run" in [r.name for r in await client.runs.list(all=True)]
        applied = await client.runs.apply_plan(plan)
        await applied.wait(timeout=60)
        assert applied.status == RunStatus.DONE

    run_async(main())


def test_async_metrics_stop_and_errors(home: Path) -> None:
    async def main() -> None:
        client = dstack.AsyncClient.from_config(home=home)
        run = await client.runs.apply_configuration(
            Task(commands=['echo \'{"acc": 0.9}\' >> "$DSTACK_METRICS_FILE"; sleep 30']),
            name="async-stop",
        )
        with pytest.raises(ResourceExistsError):
            await client.runs.apply_configuration(Task(commands=["true"]), name="async-stop")
        await run.attach()
        while not await run.get_metrics():
            await asyncio.sleep(0.05)
        assert await run.get_metrics() == [{"acc": 0.9}]
        with pytest.raises(WaitTimeoutError):
            await run.wait(timeout=0.2)
        await run.stop(abort=True)
        await run.wait(timeout=30)
        assert run.status == RunStatus.TERMINATED

    run_async(main())


def test_cancelling_a_wait_leaves_the_run_running(home: Path) -> None:
    async def main() -> None:
        client = dstack.AsyncClient.from_config(home=home)
        run = await client.runs.apply_configuration(Task(commands=["sleep 30"]))
        waiter = asyncio.ensure_future(run.wait())
        await asyncio.sleep(0.2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await run.refresh()
        assert not run.status.is_finished()
        # Other work on the loop keeps going meanwhile.
        results = await asyncio.gather(*(run.refresh() for _ in range(5)))
        assert all(r is run for r in results)
        await run.stop(abort=True)
        await run.wait(timeout=30)

    run_async(main())
