"""What the server costs a user (run by bench/server_overhead.sh):

  apply  wall time of a whole `dstack apply -y -f true.yml` process (plan, submit, attach,
         the task's end, exit) with the CLI of BEFORE (engine inside the CLI) and of AFTER
         (a client of the home's server), alternating, N runs each after 2 warm-ups, each
         in its own fresh $DSTACK_HOME;
  idle   the AFTER server's resident memory and CPU use while idle for S seconds.

usage: python bench/server_overhead.py apply BEFORE_DSTACK AFTER_DSTACK [N]
       python bench/server_overhead.py idle HOME [S]
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = 'type: task\ncommands: ["true"]\nshell: sh\nresources: {cpu: 1, memory: 0.1GB.., disk: 1GB..}\n'


def apply_once(dstack: str, home: str, file: str) -> float:
    env = dict(os.environ, DSTACK_HOME=home)
    start = time.perf_counter()
    subprocess.run([dstack, "apply", "-y", "-f", file], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def pct(samples: list, q: float) -> float:
    samples = sorted(samples)
    return samples[min(len(samples) - 1, round((len(samples) - 1) * q))]


def bench_apply(before: str, after: str, n: int) -> None:
    root = Path(tempfile.mkdtemp())
    file = root / "true.dstack.yml"
    file.write_text(TASK)
    homes = {"before": str(root / "before"), "after": str(root / "after")}
    bins = {"before": before, "after": after}
    for name in bins:
        for _ in range(2):
            apply_once(bins[name], homes[name], str(file))
    samples = {"before": [], "after": []}
    for _ in range(n):
        for name in bins:
            samples[name].append(apply_once(bins[name], homes[name], str(file)))
    for name in bins:
        s = samples[name]
        print(f"apply {name:<6} p50 {pct(s, 0.5) * 1e3:7.1f} ms  p90 {pct(s, 0.9) * 1e3:7.1f} ms"
              f"  mean {statistics.mean(s) * 1e3:7.1f} ms  ({n} runs)")
    print(f"homes: {root}")


def bench_idle(home: str, seconds: float) -> None:
    pid = json.loads(Path(home, "server", "server.json").read_text())["pid"]
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS"))
    threads = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Threads"))
    start = cpu()
    time.sleep(seconds)
    used = cpu() - start
    print(f"idle server: {rss.split(':')[1].strip()} resident, {threads.split(':')[1].strip()} threads,"
          f" CPU {used * 1e3:.0f} ms over {seconds:.0f} s ({used / seconds * 100:.2f}%)")


if __name__ == "__main__":
    if sys.argv[1] == "apply":
        bench_apply(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 20)
    elif sys.argv[1] == "idle":
        bench_idle(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 30)
    else:
        sys.exit(__doc__)
