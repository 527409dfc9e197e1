"""Times gpuhunt's query on a local catalog directory, for bench/catalog_query.sh.
usage: python gpuhunt_query.py DIR REPEATS"""

import os
import statistics
import sys
import time
from pathlib import Path

import gpuhunt
from gpuhunt._internal import storage
from gpuhunt._internal.catalog import ProviderCatalog

FLAGS = ["oci-spot", "lambda-arm", "gcp-a4", "gcp-g4", "gcp-dws-calendar-mode", "runpod-cpu",
         "runpod-cluster"]
# The same three queries as dstack-core/examples/catalog_query.rs.
QUERIES = {
    "default task (cpu 2.., memory 8GB.., on-demand)": dict(
        min_cpu=2, min_memory=8, min_gpu_count=0, gpu_vendor="nvidia", spot=False,
        min_disk_size=100),
    "gpu A100:80GB:2": dict(
        min_cpu=2, min_memory=8, gpu_name=["A100"], min_gpu_memory=80, max_gpu_memory=80,
        min_gpu_count=2, max_gpu_count=2, gpu_vendor="nvidia", spot=False, min_disk_size=100),
    "gpu 24GB.., spot auto, max_price 2": dict(
        min_cpu=2, min_memory=8, min_gpu_memory=24, min_gpu_count=1, gpu_vendor="nvidia",
        max_price=2.0, min_disk_size=100),
}


def main() -> None:
    directory, repeats = Path(sys.argv[1]), int(sys.argv[2])
    catalog = gpuhunt.Catalog(balance_resources=False, auto_reload=False)
    with open(directory / "aws.csv") as f:
        items = list(storage.load(f, provider="aws"))
    catalog.catalog["aws"] = ProviderCatalog(version="bench", items=items)
    catalog.loaded_at = time.monotonic()
    os.environ.pop("GPUHUNT_CATALOG_DIR", None)
    for name, query in QUERIES.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            found = catalog.query(provider=["aws"], allowed_flags=FLAGS, **query)
            times.append((time.perf_counter() - t) * 1000)
        print(f"{name}\t{len(found)}\t{statistics.median(times):.3f}")


main()
