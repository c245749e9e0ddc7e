"""Value types shared by component configs (durations as the Collector writes them)."""
from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``"10s"``, ``"500ms"``, ``"1m"``, ``"1h"`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '10s', '500ms' or '1m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as '10s', '500ms' or '1m', got {value!r}")
    if seconds < 0:
        raise ValueError(f"expected a non-negative duration, got {value!r}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _at_least_100ms(value: float) -> float:
    # Draining kernel maps or /proc faster than this costs more than it tells anyone.
    if value < 0.1:
        raise ValueError("collection_interval must be at least 100ms")
    return value


def _globs_not_empty(value: list[str]) -> list[str]:
    for glob in value:
        if not glob.strip():
            raise ValueError("interface globs must not be empty strings")
    return value


CollectionInterval = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_at_least_100ms)]
InterfaceGlobs = Annotated[list[str], AfterValidator(_globs_not_empty)]
