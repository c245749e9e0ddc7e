"""Kubernetes label selectors as Cilium applies them (``endpointSelector``, ``toEndpoints``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from flowtel.lib.policy.errors import PolicyError

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
# Labels Cilium derives for every endpoint, which policies may select on.
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
# Cilium label sources a selector may name; flowtel's pods only have Kubernetes labels.
_LABEL_SOURCES = ("k8s:", "any:")


def only(raw: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    """Reject keys outside ``allowed``: an unknown key is a typo or a feature, never ignored."""
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")


def _label_key(key: str) -> str:
    for prefix in _LABEL_SOURCES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present


@dataclass(frozen=True, slots=True)
class Selector:
    """A Kubernetes label selector; empty selects everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def names_key(self, key: str) -> bool:
        return any(r.key == key for r in self.requirements)


def parse_selector(raw: Any, where: str) -> Selector:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a label selector mapping")
    only(raw, ("matchLabels", "matchExpressions"), where)
    reqs: list[Requirement] = []
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise PolicyError(f"{where}.matchLabels: expected a mapping of label to value")
    for k, v in labels.items():
        reqs.append(Requirement(_label_key(str(k)), "In", (str(v),)))
    exprs = raw.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise PolicyError(f"{where}.matchExpressions: expected a list")
    for i, e in enumerate(exprs):
        w = f"{where}.matchExpressions[{i}]"
        if not isinstance(e, dict) or "key" not in e or "operator" not in e:
            raise PolicyError(f"{w}: expected key and operator")
        only(e, ("key", "operator", "values"), w)
        op = str(e["operator"])
        values = tuple(str(v) for v in (e.get("values") or []))
        if op in ("In", "NotIn") and not values:
            raise PolicyError(f"{w}: operator {op} needs values")
        if op in ("Exists", "DoesNotExist") and values:
            raise PolicyError(f"{w}: operator {op} takes no values")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise PolicyError(f"{w}.operator: {op!r} is not In, NotIn, Exists or DoesNotExist")
        reqs.append(Requirement(_label_key(str(e["key"])), op, values))
    return Selector(tuple(reqs))
