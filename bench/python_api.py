"""Python-side timings of dstack-rs (run by bench/python_api.sh):

  import   wall time of `python -c "import <module>"` (N runs; min and median), also for an
           empty interpreter, so the import's own cost is visible;
  latency  apply_configuration() -> running (or finished) of a `true` task on the local
           backend, N sequential runs, p50/p99 (what the Rust `engine_latency` example
           measures as submit -> running).

  interrupt  SIGINT -> KeyboardInterrupt while blocked in run.wait() and in run.logs()
           (following), N times each; the run is still running afterwards.

usage: python bench/python_api.py import PYTHON MODULE [N]
       python bench/python_api.py latency [N]
       python bench/python_api.py interrupt [N]
"""

import os
import signal
import statistics
import subprocess
import sys
import threading
import time


def wall(argv: list, n: int) -> list:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(argv, check=True)
        samples.append(time.perf_counter() - start)
    return samples


def bench_import(python: str, module: str, n: int) -> None:
    wall([python, "-c", f"import {module}"], 2)  # warm the page cache and .pyc files
    base = wall([python, "-c", "pass"], n)
    ours = wall([python, "-c", f"import {module}"], n)
    print(
        f"import {module:<12} min {min(ours) * 1e3:7.1f} ms  median {statistics.median(ours) * 1e3:7.1f} ms"
        f"   (empty interpreter: min {min(base) * 1e3:.1f} ms, median {statistics.median(base) * 1e3:.1f} ms)"
    )


def bench_latency(n: int) -> None:
    from dstack.api import Client, Resources, Task

    client = Client.from_config()
    task = Task(commands=["true"], shell="sh", resources=Resources(cpu=1, memory="0.1GB..", disk="1GB.."))
    client.runs.apply_configuration(task).wait()  # start the agent, warm everything
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        run = client.runs.apply_configuration(task)
        run.attach()
        samples.append(time.perf_counter() - start)
        run.wait()
    samples.sort()
    p50 = samples[len(samples) // 2]
    p99 = samples[min(len(samples) - 1, round((len(samples) - 1) * 0.99))]
    print(f"python apply_configuration->running  p50 {p50 * 1e3:8.2f} ms   p99 {p99 * 1e3:8.2f} ms")


def bench_interrupt(n: int) -> None:
    from dstack.api import Client, Resources, Task

    client = Client.from_config()
    task = Task(commands=["sleep 600"], resources=Resources(cpu=1, memory="0.1GB.."))
    run = client.runs.apply_configuration(task)
    run.attach()
    sent: list = []

    def interrupt() -> None:
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    for call in ("wait", "logs"):
        samples = []
        for _ in range(n):
            threading.Timer(0.1, interrupt).start()
            try:
                if call == "wait":
                    run.wait()
                else:
                    for _chunk in run.logs():
                        pass
            except KeyboardInterrupt:
                samples.append(time.perf_counter() - sent[-1])
        assert not run.refresh().status.is_finished(), "the run must keep running"
        samples.sort()
        print(
            f"Ctrl-C in run.{call}():  p50 {samples[len(samples) // 2] * 1e3:6.1f} ms   "
            f"max {samples[-1] * 1e3:6.1f} ms   ({len(samples)} interrupts, run still running)"
        )
    run.stop(abort=True)
    run.wait()


if __name__ == "__main__":
    if sys.argv[1] == "import":
        bench_import(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 20)
    elif sys.argv[1] == "interrupt":
        bench_interrupt(int(sys.argv[2]) if len(sys.argv) > 2 else 20)
    else:
        bench_latency(int(sys.argv[2]) if len(sys.argv) > 2 else 200)
