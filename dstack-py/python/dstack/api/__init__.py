"""dstack's Python API (`dstack.api`), served by the embedded dstack-rs engine: dstack's
documentation script runs unchanged (see `examples/quickstart.py`)."""

from dstack._async import AsyncClient, AsyncRun
from dstack._client import (
    Backend,
    BackendCollection,
    Client,
    FleetCollection,
    Run,
    RunCollection,
    ServiceModel,
    VolumeCollection,
)
from dstack._config import (
    CPU,
    GPU,
    BackendType,
    ComputeCapability,
    DevEnvironment,
    Disk,
    Fleet,
    Memory,
    OpenAIChatModel,
    Range,
    RegistryAuth,
    Resources,
    Retry,
    Scaling,
    Service,
    Task,
    TGIChatModel,
    Volume,
)
from dstack._load import load_configuration
from dstack._records import RunPlan, RunStatus
from dstack._repos import LocalRepo, RemoteRepo, RepoCollection, VirtualRepo
from dstack._sweep import Sweep
from dstack.errors import ClientError, PortUsedError

__all__ = [
    "CPU",
    "GPU",
    "AsyncClient",
    "AsyncRun",
    "Backend",
    "BackendCollection",
    "BackendType",
    "Client",
    "ClientError",
    "ComputeCapability",
    "DevEnvironment",
    "Disk",
    "Fleet",
    "FleetCollection",
    "LocalRepo",
    "Memory",
    "OpenAIChatModel",
    "PortUsedError",
    "Range",
    "RegistryAuth",
    "RemoteRepo",
    "RepoCollection",
    "Resources",
    "Retry",
    "Run",
    "RunCollection",
    "RunPlan",
    "RunStatus",
    "Scaling",
    "Service",
    "ServiceModel",
    "Sweep",
    "TGIChatModel",
    "Task",
    "VirtualRepo",
    "Volume",
    "VolumeCollection",
    "load_configuration",
]
