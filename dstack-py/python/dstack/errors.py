"""The exceptions of dstack-rs, with the names dstack uses, rooted at `DstackError`.

```
DstackError
├── ClientError
│   ├── ConfigurationError  .errors: [{file, line, column, loc, type, msg}]
│   ├── PortUsedError
│   ├── ResourceNotExistsError
│   └── ResourceExistsError
├── BackendError
│   ├── BackendAuthError
│   ├── NoCapacityError
│   └── NotSupportedError
├── WaitTimeoutError
└── SSHError
```

Ctrl-C always surfaces as `KeyboardInterrupt`, never wrapped.
"""

from typing import Any, Dict, List, Optional

__all__ = [
    "BackendAuthError",
    "BackendError",
    "ClientError",
    "ConfigurationError",
    "DstackError",
    "NoCapacityError",
    "NotSupportedError",
    "PortUsedError",
    "ResourceExistsError",
    "ResourceNotExistsError",
    "SSHError",
    "WaitTimeoutError",
]


class DstackError(Exception):
    """The root of every error dstack-rs raises."""


class ClientError(DstackError):
    """A request that cannot be served as asked (dstack's name for client-side errors)."""


class ConfigurationError(ClientError, ValueError):
    """A configuration is invalid.

    The message lists every problem as ``FILE:LINE:COL: FIELD: MESSAGE [CODE]`` (for
    configurations built in Python, which have no lines: ``SOURCE: FIELD: MESSAGE [CODE]``).
    `errors` holds the same problems as data.
    """

    def __init__(self, message: str, errors: Optional[List[Dict[str, Any]]] = None) -> None:
        super().__init__(message)
        self.errors: List[Dict[str, Any]] = list(errors or [])


class PortUsedError(ClientError):
    """A port to forward is already in use on this machine."""


class ResourceNotExistsError(ClientError):
    """The run, fleet, volume or backend resource does not exist."""


class ResourceExistsError(ClientError):
    """A resource with this name already exists (e.g. an active run of the same name)."""


class BackendError(DstackError):
    """A backend (this machine's agent, an SSH host, a cloud) failed."""


class BackendAuthError(BackendError):
    """A backend rejected or lacks credentials."""


class NoCapacityError(BackendError):
    """No offer can provide the requested resources now."""


class NotSupportedError(BackendError):
    """The operation is not supported (by this backend, or by dstack-rs yet)."""


class WaitTimeoutError(DstackError):
    """A wait ran out of time (the run keeps going)."""


class SSHError(DstackError):
    """An SSH connection failed."""
