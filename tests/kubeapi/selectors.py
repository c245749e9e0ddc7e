"""Field and label selectors as the API server parses them (the subset flowtel and tests use).

Field selectors: ``path=value``, ``path==value``, ``path!=value`` joined by commas, where the
path is a dotted JSON path (``spec.nodeName``, ``metadata.name``). Label selectors add the
set forms: ``key``, ``!key``, ``key in (a,b)``, ``key notin (a,b)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

_LABEL_TERM = re.compile(
    r"\s*(?:(?P<not>!)\s*(?P<nkey>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w./-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*(?:,|$)"
)


class SelectorError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists", "in", "notin"
    values: tuple[str, ...] = ()

    def matches(self, present: bool, value: str) -> bool:
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op == "in":
            return present and value in self.values
        return not present or value not in self.values


def parse_label_selector(text: str | None) -> tuple[Requirement, ...]:
    if not text:
        return ()
    out: list[Requirement] = []
    pos = 0
    while pos < len(text):
        m = _LABEL_TERM.match(text, pos)
        if m is None or m.end() == pos:
            raise SelectorError(f"unable to parse requirement: {text[pos:]!r}")
        pos = m.end()
        if m.group("nkey"):
            out.append(Requirement(m.group("nkey"), "!exists"))
        elif m.group("op"):
            op = "!=" if m.group("op") == "!=" else "="
            out.append(Requirement(m.group("key"), op, (m.group("value"),)))
        elif m.group("setop"):
            values = tuple(v.strip() for v in m.group("values").split(",") if v.strip())
            out.append(Requirement(m.group("key"), m.group("setop"), values))
        else:
            out.append(Requirement(m.group("key"), "exists"))
    return tuple(out)


def parse_field_selector(text: str | None) -> tuple[Requirement, ...]:
    if not text:
        return ()
    out = []
    for term in text.split(","):
        term = term.strip()
        m = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", term)
        if m is None:
            raise SelectorError(f"invalid field selector term {term!r}")
        out.append(Requirement(m.group(1), "!=" if m.group(2) == "!=" else "=", (m.group(3),)))
    return tuple(out)


def _field(obj: Mapping[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return ""
        node = node.get(part)
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def matches(obj: Mapping[str, Any], labels: tuple[Requirement, ...], fields: tuple[Requirement, ...]) -> bool:
    obj_labels = (obj.get("metadata") or {}).get("labels") or {}
    for req in labels:
        if not req.matches(req.key in obj_labels, obj_labels.get(req.key, "")):
            return False
    for req in fields:
        if not req.matches(True, _field(obj, req.key)):
            return False
    return True
