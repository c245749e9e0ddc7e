"""Kubernetes label selectors over Cilium-style endpoint labels, for ``--label`` filters.

Labels are Hubble's strings ``source:key=value`` (``k8s:app=web``, ``reserved:world``).
A selector is Kubernetes' syntax: comma-separated requirements ``key``, ``!key``,
``key=value`` (or ``==``), ``key!=value``, ``key in (a,b)``, ``key notin (a,b)``. A key
with a source prefix (``k8s:app``) matches only labels of that source; without one (or
with ``any:``) it matches any source, as Cilium's label arrays do. As in Kubernetes, ``!=``
and ``notin`` are satisfied by an endpoint that lacks the key.
"""
from __future__ import annotations

import re2

# (source or "" for any, key, operator, values)
Requirement = tuple[str, str, str, frozenset[str]]
Label = tuple[str, str, str]  # (source, key, value)

# RE2: selectors come from requests (flow filters); Python's re is quadratic on this one
# ("a" + " " * 1000 + "in" ...: 50 ms each, holding the GIL).
_REQUIREMENT = re2.compile(
    r"^\s*(?:(?P<neg>!)\s*(?P<nkey>[^\s=!,()]+)"
    r"|(?P<key>[^\s=!,()]+)\s*(?:(?P<op>==|=|!=)\s*(?P<val>[^\s,()]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<set>[^)]*)\))?)\s*$"
)


def _split(selector: str) -> list[str]:
    # Commas separate requirements except inside the parentheses of a set.
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(selector):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(selector[start:i])
            start = i + 1
    parts.append(selector[start:])
    return parts


def parse_selector(selector: str) -> list[Requirement]:
    """The requirements of one selector; ValueError names the part that does not parse."""
    reqs: list[Requirement] = []
    for part in _split(selector):
        m = _REQUIREMENT.match(part)
        if m is None or not part.strip():
            raise ValueError(f"invalid label selector {selector!r}: cannot parse {part.strip()!r}")
        if m.group("neg"):
            key, op, values = m.group("nkey"), "!exists", frozenset()
        elif m.group("op"):
            key, values = m.group("key"), frozenset([m.group("val")])
            op = "!=" if m.group("op") == "!=" else "="
        elif m.group("setop"):
            key, op = m.group("key"), m.group("setop")
            values = frozenset(v.strip() for v in m.group("set").split(",") if v.strip())
        else:
            key, op, values = m.group("key"), "exists", frozenset()
        source, _, bare = key.rpartition(":")
        reqs.append(("" if source == "any" else source, bare, op, values))
    return reqs


def parse_labels(labels: list[str]) -> list[Label]:
    out = []
    for label in labels:
        keyval, _, value = label.partition("=")
        source, _, key = keyval.rpartition(":")
        out.append((source, key, value))
    return out


def selector_matches(reqs: list[Requirement], labels: list[Label]) -> bool:
    for source, key, op, values in reqs:
        found = [v for s, k, v in labels if k == key and (not source or s == source)]
        if op == "exists":
            ok = bool(found)
        elif op == "!exists":
            ok = not found
        elif op in ("=", "in"):
            ok = any(v in values for v in found)
        else:  # "!=" and "notin"
            ok = not any(v in values for v in found)
        if not ok:
            return False
    return True
