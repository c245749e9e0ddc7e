"""Which labels and annotations become attributes, as k8sattributes' ``extract`` rules.

A rule names one key, or a regex that must match the whole key, and optionally the
attribute to write. Without ``tag_name`` the attribute is ``k8s.pod.labels.<key>``
(``k8s.pod.annotations.<key>``, ``k8s.namespace.labels.<key>``, …); with ``key_regex`` the
``tag_name`` may use the regex's groups as ``$1`` or ``${name}``, as the Collector's does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

_GROUP_REF = re.compile(r"\$(?:(\d+)|\{(\w+)\})")


@dataclass(frozen=True, slots=True)
class Rule:
    source: str  # "pod" | "namespace"
    field: str  # "labels" | "annotations"
    key: str | None
    regex: re.Pattern[str] | None
    tag_name: str | None

    def tag(self, key: str, match: re.Match[str] | None) -> str:
        if self.tag_name is None:
            return f"k8s.{self.source}.{self.field}.{key}"
        if match is None:
            return self.tag_name
        return _GROUP_REF.sub(lambda m: match.group(int(m.group(1)) if m.group(1) else m.group(2)) or "", self.tag_name)

    def wants(self, key: str) -> re.Match[str] | bool | None:
        if self.key is not None:
            return self.key == key
        assert self.regex is not None
        return self.regex.fullmatch(key)


class Extractor:
    """Compiled extract rules; applied once per pod view, never per record."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    def keeps(self, source: str, field: str, key: str) -> bool:
        """Whether any rule reads this key (everything else is dropped before caching)."""
        return any(r.source == source and r.field == field and r.wants(key) for r in self.rules)

    def attributes(
        self,
        pod_labels: Iterable[tuple[str, str]],
        pod_annotations: Iterable[tuple[str, str]],
        namespace_labels: Iterable[tuple[str, str]],
        namespace_annotations: Iterable[tuple[str, str]],
    ) -> list[tuple[str, str]]:
        if not self.rules:
            return []
        sources = {
            ("pod", "labels"): tuple(pod_labels),
            ("pod", "annotations"): tuple(pod_annotations),
            ("namespace", "labels"): tuple(namespace_labels),
            ("namespace", "annotations"): tuple(namespace_annotations),
        }
        out: list[tuple[str, str]] = []
        for rule in self.rules:
            for key, value in sources[(rule.source, rule.field)]:
                hit = rule.wants(key)
                if hit:
                    out.append((rule.tag(key, hit if isinstance(hit, re.Match) else None), value))
        return out
