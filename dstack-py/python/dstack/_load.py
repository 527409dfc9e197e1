"""`load_configuration`: a `.dstack.yml` file or text as a configuration object."""

import os
from pathlib import Path
from typing import Union

from dstack._config import _Configuration, configuration_from_data

__all__ = ["load_configuration"]


def load_configuration(path_or_text: Union[str, "os.PathLike[str]"]) -> _Configuration:
    """Reads a configuration from a file path or from YAML text, validates it (in Rust, as
    `dstack apply` does) and returns a `Task`, `Service`, `DevEnvironment`, `Fleet` or
    `Volume`. Raises `dstack.errors.ConfigurationError` with `FILE:LINE:COL: FIELD: MESSAGE`
    lines."""
    from dstack._native import validate

    if isinstance(path_or_text, str) and ("\n" in path_or_text or not os.path.isfile(path_or_text)):
        text, file = path_or_text, "<string>"
    else:
        path = Path(path_or_text)
        text, file = path.read_text(encoding="utf-8"), str(path)
    return configuration_from_data(validate(text, file))
