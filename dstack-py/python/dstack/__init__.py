"""dstack-rs: an embeddable orchestration engine for AI workloads, compatible with dstack.

```python
from dstack.api import Client, Task
client = Client.from_config()
run = client.runs.apply_configuration(Task(commands=["echo hello"]))
run.wait()
```

Names are imported on first use, so `import dstack` stays fast.
"""

from typing import TYPE_CHECKING, Any

__all__ = [
    "AsyncClient",
    "Client",
    "Run",
    "RunStatus",
    "Sweep",
    "load_configuration",
]

if TYPE_CHECKING:
    from dstack._async import AsyncClient
    from dstack._client import Client, Run
    from dstack._records import RunStatus
    from dstack._sweep import Sweep
    from dstack._load import load_configuration

_LAZY = {
    "AsyncClient": "dstack._async",
    "Client": "dstack._client",
    "Run": "dstack._client",
    "RunStatus": "dstack._records",
    "Sweep": "dstack._sweep",
    "load_configuration": "dstack._load",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dstack' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> "list[str]":
    return sorted([*globals(), *__all__])
