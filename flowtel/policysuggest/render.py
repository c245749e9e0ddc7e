"""A suggested policy as YAML with comments, or as JSON.

PyYAML cannot write comments, and the comments are the point of the YAML form: they say
what each rule and entry came from. So this is a small block-style emitter for the data a
policy holds (mappings, lists, strings, integers, booleans), kubectl's layout (list items
at their key's indent). Strings that YAML would read as anything but the same string
(``"53"``, ``"*.example.com"``, ``true``, ``1.2.3.4/32``) are written double-quoted in JSON's
escape syntax, which is valid YAML; tests load every rendering back and compare.
"""
from __future__ import annotations

import json
import re
from typing import Any

from flowtel.policysuggest.derive import Path, Suggestion

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
# YAML 1.1 (PyYAML) and 1.2 words that load as booleans or null.
_RESERVED = frozenset({"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"})
# Comments come from flows, i.e. from the network and from users: no control characters.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_INDENT = 2


def scalar(value: Any) -> str:
    """One YAML scalar that loads back as ``value``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text)


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return scalar(value)


def _comment_lines(text: str, pad: str) -> list[str]:
    return [f"{pad}# {line.translate(_CONTROL)}".rstrip() for line in text.split("\n")]


class _Emitter:
    def __init__(self, comments: dict[Path, str]) -> None:
        self.comments = comments
        self.lines: list[str] = []

    def mapping(self, d: dict[str, Any], indent: int, path: Path) -> None:
        pad = " " * indent
        for key, value in d.items():
            if isinstance(value, dict) and value:
                self.lines.append(f"{pad}{scalar(key)}:")
                self.mapping(value, indent + _INDENT, (*path, key))
            elif isinstance(value, list) and value:
                self.lines.append(f"{pad}{scalar(key)}:")
                self.sequence(value, indent, (*path, key))
            else:
                self.lines.append(f"{pad}{scalar(key)}: {_inline(value)}")

    def sequence(self, items: list[Any], indent: int, path: Path) -> None:
        pad = " " * indent
        for i, item in enumerate(items):
            comment = self.comments.get((*path, i))
            if comment:
                self.lines.extend(_comment_lines(comment, pad))
            if isinstance(item, dict) and item:
                start = len(self.lines)
                self.mapping(item, indent + _INDENT, (*path, i))
                self.lines[start] = pad + "- " + self.lines[start][indent + _INDENT:]
            elif isinstance(item, list) and item:
                self.lines.append(f"{pad}-")
                self.sequence(item, indent + _INDENT, (*path, i))
            else:
                self.lines.append(f"{pad}- {_inline(item)}")


def to_yaml(suggestion: Suggestion) -> str:
    """The policy as one YAML document: the header and per-rule/per-entry comments included."""
    emitter = _Emitter(suggestion.comments)
    emitter.lines.extend(_comment_lines("\n".join(suggestion.header), ""))
    emitter.mapping(suggestion.policy, 0, ())
    return "\n".join(emitter.lines) + "\n"


def to_json(suggestion: Suggestion) -> str:
    """The policy as JSON (provenance in ``metadata.annotations``; JSON has no comments)."""
    return json.dumps(suggestion.policy, indent=2) + "\n"
