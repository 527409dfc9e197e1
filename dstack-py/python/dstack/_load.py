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
    from dstack._native import MAX_TEXT_BYTES, validate

    if isinstance(path_or_text, str) and ("\n" in path_or_text or not os.path.isfile(path_or_text)):
        text, file = path_or_text, "<string>"
    else:
        path = Path(path_or_text)
        # No more than one byte over the limit is read: `validate` refuses the text by its
        # length, with a located error.
        with path.open("rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
        errors = "strict" if len(data) <= MAX_TEXT_BYTES else "replace"
        text, file = data.decode("utf-8", errors=errors), str(path)
    return configuration_from_data(validate(text, file))
