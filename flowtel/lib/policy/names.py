"""DNS names and Cilium's FQDN selectors (``matchName`` / ``matchPattern``), matched in linear time.

Patterns compile to RE2 (``google-re2``: Go's regexp, the engine Cilium itself uses), whose
matching time is linear in the name whatever the pattern: a tenant's ``*a*a*a*…`` cannot
hold the GIL for longer than one pass over a 253-byte name. Sizes are bounded as Cilium's
CRD bounds them (255 characters) and validated with the CRD's own patterns, run through RE2
as well (the CRD's ``^([-a-zA-Z0-9_]+[.]?)+$`` backtracks exponentially in Python's ``re``).

Semantics (Cilium's ``pkg/fqdn/matchpattern``; tables in flowtel/lib/policy/test_names.py):

- names compare lowercase, with the trailing dot removed (``API.Example.COM.`` = ``api.example.com``);
- ``*`` matches zero or more characters of one label (``[-a-z0-9_]``), never a dot; runs of
  stars inside a label (``a**b``) are one ``*``;
- a label that is only stars, ``**`` or more (``**.example.com``, ``a.**.example.com``),
  matches one or more whole labels;
- a pattern of stars alone (``*``, ``**``, ``*.``) matches every name, the root included.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import re2

from flowtel.lib.policy.errors import PolicyError

# Cilium: matchpattern.MaxFQDNLength, and the CRD's maxLength of matchName / matchPattern.
MAX_FQDN_LENGTH = 255
# The CRD's validation patterns (pkg/policy/api/fqdn.go FQDNMatchNameRegexString / ...Pattern...).
_CRD_MATCH_NAME = re2.compile(r"^([-a-zA-Z0-9_]+[.]?)+$")
_CRD_MATCH_PATTERN = re2.compile(r"^([-a-zA-Z0-9_*]+[.]?)+$")
_LABEL = "[-a-z0-9_]"
_LABELS = f"{_LABEL}+(?:\\.{_LABEL}+)*"  # one or more whole labels


def normalize_name(name: str) -> str:
    """Lowercase, no trailing dot: how names are compared (DNS is case-insensitive)."""
    return name.strip().rstrip(".").lower()


def is_valid_match_name(name: str) -> bool:
    """Whether ``name`` passes the CRD's validation of ``matchName`` (length and characters)."""
    return 0 < len(name) <= MAX_FQDN_LENGTH and _CRD_MATCH_NAME.match(name) is not None


def is_valid_match_pattern(pattern: str) -> bool:
    """Whether ``pattern`` passes the CRD's validation of ``matchPattern``."""
    return 0 < len(pattern) <= MAX_FQDN_LENGTH and _CRD_MATCH_PATTERN.match(pattern) is not None


def _is_match_all(pattern: str) -> bool:
    body = pattern[:-1] if pattern.endswith(".") else pattern
    return bool(body) and set(body) == {"*"}


def pattern_regex(pattern: str) -> str:
    """The RE2 expression (anchored) a normalized ``matchPattern`` compiles to."""
    if _is_match_all(pattern):
        return r"^(?:" + _LABELS + r")?$"
    parts = []
    for label in pattern.split("."):
        if len(label) >= 2 and set(label) == {"*"}:
            parts.append(_LABELS)
            continue
        out, i = [], 0
        while i < len(label):
            if label[i] == "*":
                while i < len(label) and label[i] == "*":
                    i += 1
                out.append(f"{_LABEL}*")
            else:
                out.append(re2.escape(label[i]))
                i += 1
        parts.append("".join(out))
    return "^" + r"\.".join(parts) + "$"


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> Any:
    return re2.compile(pattern_regex(pattern))


@dataclass(frozen=True, slots=True)
class FqdnSelector:
    """One ``matchName`` or ``matchPattern``, normalized (lowercase, no trailing dot)."""

    match_name: str = ""
    match_pattern: str = ""

    @property
    def match_all(self) -> bool:
        return bool(self.match_pattern) and _is_match_all(self.match_pattern)

    def matches(self, name: str) -> bool:
        name = normalize_name(name)
        if self.match_name:
            return name == self.match_name
        if self.match_all:
            return True
        if len(name) > MAX_FQDN_LENGTH:  # no DNS name is longer; RE2 would still be linear
            return False
        return _compiled(self.match_pattern).match(name) is not None

    def to_dict(self) -> dict[str, str]:
        return {"matchName": self.match_name} if self.match_name else {"matchPattern": self.match_pattern}


def parse_fqdn_selector(raw: Any, where: str) -> FqdnSelector:
    """A ``toFQDNs`` or ``rules.dns`` item, validated as Cilium's CRD and agent validate it."""
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping with matchName or matchPattern")
    unknown = sorted(set(raw) - {"matchName", "matchPattern"})
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    name, pattern = raw.get("matchName"), raw.get("matchPattern")
    if (name is None) == (pattern is None):
        raise PolicyError(f"{where}: exactly one of matchName and matchPattern is required")
    if name is not None:
        text = str(name)
        if not is_valid_match_name(text):
            hint = " (use matchPattern for '*')" if "*" in text else ""
            raise PolicyError(f"{where}.matchName: {text!r} is not a DNS name: 1 to {MAX_FQDN_LENGTH} characters "
                              f"of a-z, 0-9, '-', '_' in dot-separated labels, no leading dot or spaces{hint}")
        return FqdnSelector(match_name=normalize_name(text))
    text = str(pattern)
    if not is_valid_match_pattern(text):
        raise PolicyError(f"{where}.matchPattern: {text!r} is not a pattern: 1 to {MAX_FQDN_LENGTH} characters "
                          "of a-z, 0-9, '-', '_', '*' in dot-separated labels, no leading dot or spaces")
    value = text.lower()
    if _is_match_all(value):
        return FqdnSelector(match_pattern="*")
    return FqdnSelector(match_pattern=value.rstrip("."))


def is_dns_name(name: str) -> bool:
    """A name Cilium's ``matchName`` accepts (for ``policy suggest``): linear-time check."""
    return is_valid_match_name(name) and ".." not in name
