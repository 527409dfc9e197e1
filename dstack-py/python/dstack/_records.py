"""Shared pieces of the sync and async clients: statuses, the client registry, plans,
turning configurations into data, and notebook rendering."""

import os
from datetime import datetime, timezone
from enum import Enum
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from dstack import _binaries
from dstack._config import _Configuration, backend_type, plain

if TYPE_CHECKING:
    from dstack._native import RawClient

__all__ = [
    "Gpu",
    "InstanceDisk",
    "InstanceOfferWithAvailability",
    "InstanceResources",
    "InstanceType",
    "JobPlan",
    "RunPlan",
    "RunStatus",
]

ConfigurationLike = Union[_Configuration, Dict[str, Any], str]


class RunStatus(str, Enum):
    """A run's status, as dstack names it."""

    PENDING = "pending"
    SUBMITTED = "submitted"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"
    DONE = "done"

    def is_finished(self) -> bool:
        """Whether the run has ended (terminated, failed or done)."""
        return self in (RunStatus.TERMINATED, RunStatus.FAILED, RunStatus.DONE)

    def __str__(self) -> str:
        return self.value


def home_dir(home: Union[str, "os.PathLike[str]", None] = None) -> Path:
    """The state directory: `home`, `$DSTACK_HOME`, or `~/.dstack`."""
    if home is not None:
        return Path(home)
    env = os.environ.get("DSTACK_HOME")
    return Path(env) if env else Path.home() / ".dstack"


_OPEN: Dict[Tuple[Path, Optional[str], Optional[str]], "RawClient"] = {}


def open_raw(
    home: Union[str, "os.PathLike[str]", None],
    server_url: Optional[str] = None,
    user_token: Optional[str] = None,
    project: Optional[str] = None,
) -> "RawClient":
    """A client of the state directory's `dstack server` (started in the background when
    none answers), or of the server at `server_url`; opened once per process."""
    from dstack._native import RawClient

    path = home_dir(home).expanduser().absolute()
    key = (path, server_url, project)
    raw = _OPEN.get(key)
    if raw is None:
        server = _binaries.server()
        raw = RawClient.open(
            str(path),
            None if server is None else str(server),
            server_url,
            user_token,
            project,
        )
        _OPEN[key] = raw
    return raw


ConfigurationData = Union[Dict[str, Any], str]
"""A configuration as the native side takes it: plain data, or YAML text."""


def configuration_data(configuration: ConfigurationLike, profile: Any = None) -> ConfigurationData:
    """What the native side validates: plain data, or YAML text; with `profile` (see
    `with_profile`), plain data."""
    if isinstance(configuration, str):
        return with_profile(configuration, profile)
    if isinstance(configuration, _Configuration):
        return with_profile(configuration.to_data(), profile)
    if isinstance(configuration, dict):
        data: Dict[str, Any] = plain(configuration)
        return with_profile(data, profile)
    raise TypeError(
        "expected a configuration (Task, Service, DevEnvironment, a dict or YAML text), "
        f"not {type(configuration).__name__}"
    )


def with_profile(data: Union[Dict[str, Any], str], profile: Any) -> Union[Dict[str, Any], str]:
    """`data` with the parameters of `profile` (a mapping, or dstack's `Profile`) that it
    does not set itself (the configuration's own win, as in dstack); `data` unchanged
    without a profile."""
    if profile is None:
        return data
    from dstack._native import with_profile as merged

    return merged(data, plain(_profile_fields(profile)))


def _profile_fields(profile: Any) -> Dict[str, Any]:
    """A profile's fields: a mapping's items, or a pydantic model's dump."""
    if isinstance(profile, Mapping):
        return {str(k): v for k, v in profile.items()}
    for method in ("model_dump", "dict"):
        dump = getattr(profile, method, None)
        if callable(dump):
            fields = dump()
            if isinstance(fields, dict):
                return fields
    from dstack.errors import ConfigurationError

    raise ConfigurationError(
        f"profile= takes a mapping of profile parameters or dstack's Profile, not {type(profile).__name__}"
    )


def no_offer_variants(full_offers: bool, unallocated_resources: bool) -> None:
    """`full_offers` and `unallocated_resources` (offers not adjusted to the run, or only
    the unallocated part of hosts) are not supported."""
    from dstack.errors import NotSupportedError

    if full_offers:
        raise NotSupportedError(
            "full_offers=True is not supported: offers are listed as they fit the run"
        )
    if unallocated_resources:
        raise NotSupportedError(
            "unallocated_resources=True is not supported: offers list whole hosts"
        )


def timestamp(ms: Optional[int]) -> Optional[datetime]:
    """A record's millisecond timestamp as an aware datetime."""
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


class Gpu:
    """One GPU of an offer (dstack's `Gpu`)."""

    def __init__(self, record: Dict[str, Any]) -> None:
        self.name: str = record["name"]
        self.memory_mib: int = int(record["memory_mib"])
        self.vendor: str = record["vendor"]

    def __repr__(self) -> str:
        return f"Gpu(name={self.name!r}, memory_mib={self.memory_mib})"


class InstanceDisk:
    """An offer's disk (dstack's `Disk` of instance resources)."""

    def __init__(self, size_mib: int) -> None:
        self.size_mib = size_mib

    def __repr__(self) -> str:
        return f"InstanceDisk(size_mib={self.size_mib})"


class InstanceResources:
    """What an offer provides (dstack's instance `Resources`)."""

    def __init__(self, record: Dict[str, Any], spot: bool) -> None:
        self.cpus: int = int(record["cpus"])
        self.memory_mib: int = int(record["memory_bytes"]) // 2**20
        self.gpus = [Gpu(g) for g in record.get("gpus") or []]
        self.spot = spot
        self.disk = InstanceDisk(int(record.get("disk_bytes", 0)) // 2**20)
        self.cpu_arch: Optional[str] = record.get("cpu_arch")

    def __repr__(self) -> str:
        return f"InstanceResources({_resources_of(self)})"


class InstanceType:
    """An offer's instance type (or host name) and resources (dstack's `InstanceType`)."""

    def __init__(self, name: str, resources: InstanceResources) -> None:
        self.name = name
        self.resources = resources

    def __repr__(self) -> str:
        return f"InstanceType({self.name!r})"


class InstanceOfferWithAvailability:
    """Where a job can run (dstack's `InstanceOfferWithAvailability`): `backend`, `region`,
    `instance` (type and resources), `price` per hour, `availability` (`idle` or `busy`
    for an existing instance, `available` for new capacity, `not_available`)."""

    def __init__(self, record: Dict[str, Any]) -> None:
        self.backend = backend_type(str(record["backend"]))
        self.region: str = record["region"]
        self.instance = InstanceType(record["instance_type"], InstanceResources(record["resources"], bool(record["spot"])))
        self.price = float(record["price"])
        self.availability: str = record["availability"]
        self.availability_zones: Optional[List[str]] = record.get("availability_zones")
        self.backend_data: Dict[str, Any] = record.get("backend_data") or {}

    def __repr__(self) -> str:
        return f"<Offer {self.backend.value} {self.region} {self.instance.name} ${self.price:g} {self.availability}>"


class JobPlan:
    """The offers for one job of a run (dstack's `job_plans[i]`), as typed records."""

    def __init__(self, offers: List[Dict[str, Any]]) -> None:
        self.offers = [InstanceOfferWithAvailability(o) for o in offers]
        self.total_offers = len(offers)
        self.max_price = max((o.price for o in self.offers), default=None)


class RunPlan:
    """Where a configuration would run: `offers` (idle instances first), or
    `no_offers_reason`. Apply it with `client.runs.apply_plan(plan)`."""

    def __init__(
        self,
        raw: Dict[str, Any],
        configuration: Union[Dict[str, Any], str],
        configuration_path: Optional[str] = None,
        client_dir: Optional[str] = None,
        max_offers: Optional[int] = None,
        ssh_key_pub: Optional[str] = None,
    ) -> None:
        self.configuration: Dict[str, Any] = raw["configuration"]
        self.configuration_path = configuration_path
        # Where its jobs on this machine run: the repo's directory (None: the current one).
        self._client_dir = client_dir
        self.offers: List[Dict[str, Any]] = raw["offers"][:max_offers]
        self.no_offers_reason: Optional[str] = raw["no_offers_reason"]
        self.job_plans = [JobPlan(self.offers)]
        self._submitted = configuration
        # The public key `ssh <run>` accepts once the plan is applied.
        self._ssh_key_pub = ssh_key_pub

    def __repr__(self) -> str:
        return f"RunPlan(offers={len(self.offers)}, no_offers_reason={self.no_offers_reason!r})"

    def _repr_html_(self) -> str:
        rows = [
            [
                o["backend"],
                o["region"],
                o["instance_type"],
                _resources(o["resources"]),
                "yes" if o["spot"] else "no",
                f"${o['price']:g}",
                o["availability"],
            ]
            for o in self.offers
        ]
        header = ["backend", "region", "instance", "resources", "spot", "price", "status"]
        caption = self.no_offers_reason or f"{len(self.offers)} offer(s)"
        return html_table(header, rows, caption)


def _resources(host: Dict[str, Any]) -> str:
    return _resources_of(InstanceResources(host, False))


def _resources_of(resources: InstanceResources) -> str:
    parts = [f"{resources.cpus}xCPU"]
    if resources.memory_mib:
        parts.append(f"{resources.memory_mib / 1024:.0f}GB")
    if resources.gpus:
        parts.append(f"{len(resources.gpus)}x{resources.gpus[0].name}")
    return ", ".join(parts)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    """A small HTML table for notebooks."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
