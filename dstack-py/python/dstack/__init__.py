"""dstack-rs: an embeddable orchestration engine for AI workloads, compatible with dstack."""

import json
from typing import Any, Dict

from dstack._native import ConfigurationError, parse_configuration

__all__ = ["ConfigurationError", "load_configuration"]


def load_configuration(text: str, file: str = "<string>") -> Dict[str, Any]:
    """Validates a `.dstack.yml` text and returns the normalized configuration as a dict.

    Raises ConfigurationError listing every problem as FILE:LINE:COL: FIELD: MESSAGE.
    """
    result: Dict[str, Any] = json.loads(parse_configuration(text, file))
    return result
