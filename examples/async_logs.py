"""The asyncio client: submit a task, follow its logs with `async for`, wait for the exit status.

Run with: python examples/async_logs.py
"""

import asyncio
import sys

import dstack
from dstack.api import Task


async def main() -> int:
    client = dstack.AsyncClient.from_config()
    task = Task(
        name="async-logs",
        commands=["for i in 1 2 3; do echo \"tick $i\"; sleep 0.2; done", 'echo "done: $GREETING"'],
        env={"GREETING": "hello from asyncio"},
    )
    run = await client.runs.apply_configuration(task)
    if await run.attach():
        async for chunk in run.logs():
            sys.stdout.write(chunk.decode(errors="replace"))
    await run.wait()
    print(f"run {run.name}: {run.status.value}, exit status {run.exit_status}")
    return 0 if run.exit_status == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
