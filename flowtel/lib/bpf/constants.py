"""The constants of ``bpf/flowtel.h``, read from the header itself: Python keeps no copy.

Every ``#define FLOWTEL_<NAME> <integer>`` of the header is an attribute of :data:`HEADER`
(``HEADER.CNT_FLOW_UPDATE_FAIL``, without the prefix). A name the header does not define is
an AttributeError at import of the module that uses it, so a renamed constant cannot go
unnoticed; tests/contracts/test_header_constants.py checks the values against the C preprocessor's.
"""
from __future__ import annotations

import re

from bpf import BPF_DIR

HEADER_PATH = BPF_DIR / "flowtel.h"

_DEFINE = re.compile(r"^\s*#\s*define\s+FLOWTEL_([A-Z0-9_]+)\s+(0[xX][0-9a-fA-F]+|\d+)\b", re.MULTILINE)


def parse_header(text: str) -> dict[str, int]:
    """``{NAME: value}`` of the integer ``#define FLOWTEL_NAME value`` lines of ``text``."""
    out: dict[str, int] = {}
    for name, value in _DEFINE.findall(text):
        out[name] = int(value, 0)
    return out


class HeaderConstants:
    """The header's integer constants as attributes (read-only)."""

    __slots__ = ("_values",)
    _values: dict[str, int]

    def __init__(self, values: dict[str, int]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> int:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"bpf/flowtel.h defines no FLOWTEL_{name}") from None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("header constants are read-only")

    def items(self) -> dict[str, int]:
        return dict(self._values)

    def with_prefix(self, prefix: str) -> dict[str, int]:
        """``{name without prefix: value}`` of the constants whose names start with ``prefix``."""
        return {k[len(prefix):]: v for k, v in self._values.items() if k.startswith(prefix)}


HEADER = HeaderConstants(parse_header(HEADER_PATH.read_text()))
