"""Configuration classes: `Task`, `Service`, `DevEnvironment`, `Fleet`, `Volume`, and the
pieces they are made of (`Resources`, `CPU`, `GPU`, `Memory`, `Disk`, `Range`,
`RegistryAuth`, ...).

They take dstack's keyword arguments and only build plain data: validation happens once, in
Rust, with the same rules and messages as for `.dstack.yml` files. A top-level configuration
is validated when it is created (an invalid one raises `dstack.errors.ConfigurationError`
naming the field); its normalized fields read as attributes (`task.image`, `task.env`).
"""

from enum import Enum
from pathlib import PurePath
from typing import Any, ClassVar, Dict, Generic, Optional, Tuple, TypeVar, Union

__all__ = [
    "CPU",
    "GPU",
    "BackendType",
    "ComputeCapability",
    "DevEnvironment",
    "Disk",
    "Fleet",
    "Memory",
    "OpenAIChatModel",
    "Range",
    "RegistryAuth",
    "Resources",
    "Retry",
    "Scaling",
    "Service",
    "TGIChatModel",
    "Task",
    "Volume",
    "backend_type",
    "configuration_from_data",
    "plain",
]

T = TypeVar("T")


# Deeper than this, `plain` passes dicts and lists on as they are: the native side refuses data
# nested beyond its own, lower limit with a `ConfigurationError` (a dict that contains itself
# would otherwise recurse here until Python's `RecursionError`); a configuration object that
# deep (one that contains itself) is refused here.
_PLAIN_MAX_DEPTH = 256


def plain(value: Any, _depth: int = 0) -> Any:
    """`value` as plain data (dicts, lists, strings, numbers, booleans, None)."""
    if isinstance(value, (_Data, Range)):
        if _depth >= _PLAIN_MAX_DEPTH:
            from dstack.errors import ConfigurationError

            raise ConfigurationError(
                f"{type(value).__name__}(...) nested more than {_PLAIN_MAX_DEPTH} levels deep "
                "(does a value contain itself?)"
            )
        return value.to_data(_depth)
    if isinstance(value, Memory):
        return f"{float(value):g}GB"
    if isinstance(value, Enum):
        return plain(value.value, _depth)
    if isinstance(value, PurePath):
        return str(value)
    if _depth >= _PLAIN_MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {str(k): plain(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, _depth + 1) for v in value]
    return value


class _Data:
    """Keyword arguments as fields; `None` fields are left out (dstack's defaults apply)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__["_fields"] = dict(fields)

    def to_data(self, _depth: int = 0) -> Dict[str, Any]:
        """The fields as plain data."""
        fields: Dict[str, Any] = self.__dict__["_fields"]
        return {k: plain(v, _depth + 1) for k, v in fields.items() if v is not None}

    def __getattr__(self, name: str) -> Any:
        fields: Dict[str, Any] = self.__dict__["_fields"]
        if name in fields:
            return fields[name]
        if name.startswith("_"):
            raise AttributeError(name)
        return None

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__["_fields"][name] = value

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and plain(other) == plain(self)

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__["_fields"].items())
        return f"{type(self).__name__}({fields})"


class Range(Generic[T]):
    """A range of values: `Range[int](min=1, max=4)`; either bound may be left open."""

    def __init__(self, min: Optional[T] = None, max: Optional[T] = None) -> None:
        self.min = min
        self.max = max

    def to_data(self, _depth: int = 0) -> Dict[str, Any]:
        """`{"min": ..., "max": ...}` without the open bounds."""
        data = {"min": plain(self.min, _depth + 1), "max": plain(self.max, _depth + 1)}
        return {k: v for k, v in data.items() if v is not None}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Range) and (other.min, other.max) == (self.min, self.max)

    def __hash__(self) -> int:
        return hash((self.min, self.max))

    def __repr__(self) -> str:
        lo = "" if self.min is None else str(self.min)
        hi = "" if self.max is None else str(self.max)
        return f"Range({lo}..{hi})"


class Memory(float):
    """An amount of memory in GB: `Memory(16)` or `Memory.parse("512MB")`."""

    _UNITS: ClassVar[Dict[str, float]] = {
        "MB": 1 / 1024,
        "GB": 1.0,
        "TB": 1024.0,
    }

    @classmethod
    def parse(cls, value: Union[str, float, int]) -> "Memory":
        """Reads `"512MB"`, `"16GB"`, `"1TB"` or a number of GB."""
        if isinstance(value, (int, float)):
            return cls(value)
        text = value.strip().upper()
        for unit, factor in cls._UNITS.items():
            if text.endswith(unit):
                return cls(float(text[: -len(unit)]) * factor)
        return cls(float(text))

    def __repr__(self) -> str:
        return f"{float(self):g}GB"


class CPU(_Data):
    """CPU requirements: `CPU(count=Range[int](min=4), arch="x86")`."""


class GPU(_Data):
    """GPU requirements: `GPU(name="A100", count=2, memory="40GB..")`, `GPU(count=0)`."""


class ComputeCapability(Tuple[int, int]):
    """A CUDA compute capability, `(major, minor)` as dstack's: `ComputeCapability((8, 0))`,
    or `ComputeCapability.validate("8.0")` (GPU's `compute_capability` also takes the text)."""

    @classmethod
    def validate(cls, value: Any) -> "ComputeCapability":
        """Parses `"8.0"`, `8.0` or `(8, 0)`."""
        if isinstance(value, float):
            value = str(value)
        if isinstance(value, str):
            value = value.strip().split(".")
        if isinstance(value, (tuple, list)) and len(value) == 2:
            try:
                return cls((int(value[0]), int(value[1])))
            except ValueError:
                pass
        from dstack.errors import ConfigurationError

        raise ConfigurationError(f"invalid compute capability: {value!r}")

    def __str__(self) -> str:
        return f"{self[0]}.{self[1]}"


class Disk(_Data):
    """Disk requirements: `Disk(size="100GB..")`."""


class Resources(_Data):
    """Resource requirements: `cpu`, `memory`, `shm_size`, `gpu`, `disk`."""


class RegistryAuth(_Data):
    """Credentials of a private image registry: `username`, `password`."""


class Retry(_Data):
    """A retry policy: `on_events`, `duration`."""


class Scaling(_Data):
    """Service auto-scaling: `metric`, `target`, `scale_up_delay`, `scale_down_delay`."""


class OpenAIChatModel(_Data):
    """A service's chat model with an OpenAI-compatible API: `name`, `prefix` (default
    `/v1`)."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(**{"type": "chat", "format": "openai", **fields})


class TGIChatModel(_Data):
    """A service's chat model served by TGI: `name`, `chat_template`, `eos_token`."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(**{"type": "chat", "format": "tgi", **fields})


class BackendType(str, Enum):
    """Backends by dstack's names (`backends=[BackendType.AWS]`); `LOCAL` is this machine,
    `REMOTE` SSH fleets."""

    AMDDEVCLOUD = "amddevcloud"
    AWS = "aws"
    AZURE = "azure"
    CLOUDRIFT = "cloudrift"
    CRUSOE = "crusoe"
    CUDO = "cudo"
    DATACRUNCH = "datacrunch"
    DAYTONA = "daytona"
    DIGITALOCEAN = "digitalocean"
    DSTACK = "dstack"
    GCP = "gcp"
    HOTAISLE = "hotaisle"
    JARVISLABS = "jarvislabs"
    KUBERNETES = "kubernetes"
    LAMBDA = "lambda"
    LIUM = "lium"
    LOCAL = "local"
    NEBIUS = "nebius"
    OCI = "oci"
    REMOTE = "remote"
    RUNPOD = "runpod"
    SEEWEB = "seeweb"
    SLURM = "slurm"
    TENSORDOCK = "tensordock"
    VASTAI = "vastai"
    VERDA = "verda"
    VULTR = "vultr"

    def __str__(self) -> str:
        return self.value


# Backends named differently here: SSH fleets are dstack's `remote` backend.
_BACKEND_TYPES = {"ssh": BackendType.REMOTE}


def backend_type(name: str) -> BackendType:
    """The `BackendType` of a backend as records here name it (`ssh` is `REMOTE`)."""
    return BackendType(_BACKEND_TYPES.get(name, name))


class _Configuration(_Data):
    """A top-level configuration: validated (in Rust) when created."""

    TYPE: ClassVar[str] = ""

    def __init__(self, **fields: Any) -> None:
        fields.pop("type", None)
        super().__init__(**fields)
        self.__dict__["_normalized"] = None
        self.validate()

    def to_data(self, _depth: int = 0) -> Dict[str, Any]:
        """The configuration as plain data, with its `type`."""
        return {"type": self.TYPE, **super().to_data(_depth)}

    def validate(self) -> Dict[str, Any]:
        """Validates the current fields; returns the normalized configuration (dstack's JSON
        shape). Raises `dstack.errors.ConfigurationError`."""
        from dstack._native import validate

        normalized: Dict[str, Any] = validate(self.to_data(), f"{type(self).__name__}(...)")
        self.__dict__["_normalized"] = normalized
        return normalized

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self.__dict__["_normalized"] = None

    def __getattr__(self, name: str) -> Any:
        fields: Dict[str, Any] = self.__dict__["_fields"]
        if name in fields or name.startswith("_"):
            return super().__getattr__(name)
        normalized = self.__dict__.get("_normalized") or self.validate()
        return normalized.get(name)

    def dict(self) -> Dict[str, Any]:
        """The normalized configuration."""
        return dict(self.__dict__.get("_normalized") or self.validate())

    def json(self) -> str:
        """The normalized configuration as JSON."""
        import json

        return json.dumps(self.dict())


class Task(_Configuration):
    """`type: task` — a batch job: `commands`, `resources`, `env`, `nodes`, `ports`, ..."""

    TYPE = "task"


class Service(_Configuration):
    """`type: service` — a long-running job serving a `port`."""

    TYPE = "service"


class DevEnvironment(_Configuration):
    """`type: dev-environment` — an interactive environment with an `ide`."""

    TYPE = "dev-environment"


class Fleet(_Configuration):
    """`type: fleet` — instances to run on (`nodes`, or `ssh_config` for your own hosts)."""

    TYPE = "fleet"


class Volume(_Configuration):
    """`type: volume` — a network volume."""

    TYPE = "volume"


_CLASSES: Dict[str, type] = {
    c.TYPE: c for c in (Task, Service, DevEnvironment, Fleet, Volume)
}


def configuration_from_data(data: Dict[str, Any]) -> _Configuration:
    """The configuration object for a normalized configuration dict."""
    cls = _CLASSES.get(str(data.get("type")))
    if cls is None:
        from dstack.errors import NotSupportedError

        raise NotSupportedError(f"`type: {data.get('type')}` configurations are not supported here")
    config: _Configuration = cls(**data)
    return config
