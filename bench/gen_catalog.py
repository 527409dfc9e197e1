"""Writes a synthetic gpuhunt-format catalog (aws.csv) of N offers for benchmarks:
instance types of several families in many locations, on-demand and spot, sorted by price.
usage: python3 bench/gen_catalog.py DIR [N]"""

import csv
import random
import sys
from pathlib import Path

FIELDS = ["instance_name", "location", "price", "cpu", "memory", "gpu_count", "gpu_name",
          "gpu_memory", "spot", "disk_size", "gpu_vendor", "flags", "cpu_arch", "provider_data"]
GPUS = [("T4", 16.0), ("A10G", 24.0), ("L4", 24.0), ("L40S", 48.0), ("A100", 40.0),
        ("A100", 80.0), ("H100", 80.0), ("V100", 16.0), ("MI300X", 192.0)]


def main() -> None:
    out = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 120_000
    rng = random.Random(42)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        cpu = rng.choice([1, 2, 4, 8, 16, 32, 48, 64, 96, 192])
        memory = float(cpu * rng.choice([2, 4, 8]))
        gpu_count = rng.choice([0, 0, 0, 1, 1, 2, 4, 8])
        name, gpu_memory = rng.choice(GPUS)
        spot = rng.random() < 0.4
        price = round(cpu * 0.04 + gpu_count * gpu_memory * 0.03 * rng.uniform(0.8, 1.2), 5)
        rows.append({
            "instance_name": f"x{k % 997}.{cpu}xlarge",
            "location": f"region-{k % 31}",
            "price": round(price * (0.35 if spot else 1.0), 5),
            "cpu": cpu,
            "memory": memory,
            "gpu_count": gpu_count,
            "gpu_name": name if gpu_count else "",
            "gpu_memory": gpu_memory if gpu_count else "",
            "spot": str(spot),
            "disk_size": rng.choice(["", "", 100.0, 500.0]),
            "gpu_vendor": ("amd" if name == "MI300X" else "nvidia") if gpu_count else "",
            "flags": "some-new-flag" if rng.random() < 0.01 else "",
            "cpu_arch": "arm" if rng.random() < 0.05 else "x86",
            "provider_data": "{}",
        })
    rows.sort(key=lambda r: r["price"])
    with open(out / "aws.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


main()
