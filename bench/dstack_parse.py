"""Times dstack's own configuration parser (yaml.safe_load + parse_apply_configuration, as
`dstack apply` does) over the given files. Prints: files, rounds, seconds per configuration."""
import sys
import time

import yaml
from dstack._internal.core.models.configurations import parse_apply_configuration

files = sys.argv[2:]
rounds = int(sys.argv[1])
texts = [open(f).read() for f in files]
for text in texts:  # warm up and make sure every file is valid for dstack too
    parse_apply_configuration(yaml.safe_load(text))
start = time.perf_counter()
for _ in range(rounds):
    for text in texts:
        parse_apply_configuration(yaml.safe_load(text))
elapsed = time.perf_counter() - start
print(f"dstack {len(texts)} {rounds} {elapsed / (rounds * len(texts)):.9f}")
