"""Sweeps at scale (issue 28), run by bench/sweep_scale.sh:

  ours N    a sweep of N `true` trials through the Python API, max_parallel=2, in the home
            `$DSTACK_HOME`: submit (`client.runs.sweep`), wait (`sweep.wait()`), results
            (`sweep.to_pandas()`); prints one line of seconds and ms per trial.
  finished N  fills `$DSTACK_HOME` with N finished runs (sweeps of `true`, 1000 at a time).
  ray N     the same N tasks through Ray (`ray.init(num_cpus=2)`, `@ray.remote(num_cpus=1)`
            running `subprocess.run(["true"])`), run in Ray's own virtual environment.
  floor N   N spawns of `true`, two at a time.

usage: python bench/sweep_scale.py {ours|finished|ray|floor} N
"""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def line(what: str, n: int, seconds: float, extra: str = "") -> None:
    print(f"{what:<28} n={n:<6} {seconds:8.3f} s  {seconds / n * 1e3:7.3f} ms/trial  {extra}", flush=True)


def ours(n: int) -> None:
    from dstack.api import Client, Resources, Task

    client = Client.from_config()
    task = Task(commands=["true"], shell="sh", resources=Resources(cpu="1.."))
    client.runs.apply_configuration(task).wait()  # the server and the agent up, caches warm
    start = time.perf_counter()
    sweep = client.runs.sweep(task, {"i": list(range(n))}, max_parallel=2)
    submitted = time.perf_counter()
    sweep.wait(progress=False)
    waited = time.perf_counter()
    frame = sweep.to_pandas()
    tabled = time.perf_counter()
    assert len(frame) == n and set(frame["status"]) == {"done"}, frame["status"].value_counts()
    line(
        "dstack-rs sweep",
        n,
        waited - start,
        f"(submit {submitted - start:.3f} s, wait {waited - submitted:.3f} s, "
        f"to_pandas {tabled - waited:.3f} s)",
    )


def finished(n: int) -> None:
    from dstack.api import Client, Resources, Task

    client = Client.from_config()
    task = Task(commands=["true"], shell="sh", resources=Resources(cpu="1.."))
    start = time.perf_counter()
    for first in range(0, n, 1000):
        trials = list(range(first, min(n, first + 1000)))
        client.runs.sweep(task, {"i": trials}, max_parallel=2).wait(progress=False)
    line("fill: finished runs", n, time.perf_counter() - start)


def ray(n: int) -> None:
    import ray as ray_

    ray_.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")

    @ray_.remote(num_cpus=1)
    def trial(i: int) -> int:
        return subprocess.run(["true"]).returncode

    ray_.get([trial.remote(i) for i in range(2)])  # workers up
    start = time.perf_counter()
    codes = ray_.get([trial.remote(i) for i in range(n)])
    seconds = time.perf_counter() - start
    assert codes == [0] * n
    line(f"ray {ray_.__version__}", n, seconds)


def floor(n: int) -> None:
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda _: subprocess.run(["true"]).returncode, range(n)))
    assert codes == [0] * n
    line("floor (2 at a time)", n, time.perf_counter() - start)


if __name__ == "__main__":
    {"ours": ours, "finished": finished, "ray": ray, "floor": floor}[sys.argv[1]](int(sys.argv[2]))
