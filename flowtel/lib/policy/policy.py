"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy (cilium.io/v2) documents.

Parsing is strict about shape: an unknown key, or a rule Cilium itself rejects, rejects the
policy with a message naming it and the key (Cilium would not enforce it either). What
Cilium enforces and flowtel cannot evaluate does not reject the policy: its pods stay
policed, the part that cannot be evaluated allows nothing (or, in a deny rule, denies
everything it might have selected), and :attr:`Policy.notes` names each such field, so the
proxy reports the policy as degraded. Each policy file is independent: one invalid policy
never stops the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowtel.lib.policy.errors import PolicyError
from flowtel.lib.policy.pods import Pod
from flowtel.lib.policy.rules import EgressRule, parse_egress_rule, validate_ingress
from flowtel.lib.policy.selectors import Selector, only, parse_selector

API_VERSION = "cilium.io/v2"
KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
_SPEC_KEYS = ("endpointSelector", "nodeSelector", "egress", "egressDeny", "ingress", "ingressDeny", "description",
              "labels", "enableDefaultDeny")


@dataclass(frozen=True, slots=True)
class Spec:
    """One rule of a policy (``spec``, or one item of ``specs``)."""

    selector: Selector | None  # None: a host policy (nodeSelector), which selects no pod
    egress: tuple[EgressRule, ...]
    egress_deny: tuple[EgressRule, ...]
    polices_egress: bool  # default-deny egress for the pods it selects


@dataclass(frozen=True, slots=True)
class Policy:
    kind: str
    name: str
    namespace: str | None  # None for a clusterwide policy
    specs: tuple[Spec, ...]
    source: str
    notes: tuple[str, ...] = ()  # what flowtel cannot evaluate (denied instead): a degraded policy

    @property
    def ref(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {ns}{self.name} ({self.source})"

    @property
    def degraded(self) -> bool:
        return bool(self.notes)

    @property
    def selector(self) -> Selector | None:
        return self.specs[0].selector

    @property
    def egress(self) -> tuple[EgressRule, ...]:
        return tuple(r for s in self.specs for r in s.egress)

    @property
    def polices_egress(self) -> bool:
        return any(s.polices_egress for s in self.specs)

    def selecting_specs(self, pod: Pod) -> list[Spec]:
        if self.namespace is not None and pod.namespace != self.namespace:
            return []
        labels = pod.selector_labels()
        return [s for s in self.specs if s.selector is not None and s.selector.matches(labels)]

    def selects(self, pod: Pod) -> bool:
        return bool(self.selecting_specs(pod))


def _parse_spec(spec: Any, where: str, namespace: str | None, notes: list[str]) -> Spec:
    if not isinstance(spec, dict):
        raise PolicyError(f"{where}: expected a mapping")
    only(spec, _SPEC_KEYS, where)
    if ("endpointSelector" in spec) == ("nodeSelector" in spec):
        raise PolicyError(f"{where}: rule must have one of endpointSelector or nodeSelector" if "nodeSelector" not in spec
                          else f"{where}: rule cannot have both endpointSelector and nodeSelector")
    selector: Selector | None = None
    if "endpointSelector" in spec:
        selector = parse_selector(spec["endpointSelector"], f"{where}.endpointSelector")
    else:
        parse_selector(spec["nodeSelector"], f"{where}.nodeSelector")
        notes.append(f"{where}.nodeSelector: host policies are not enforced by flowtel (it polices pods only)")
    if not any(spec.get(k) for k in ("egress", "egressDeny", "ingress", "ingressDeny")):
        raise PolicyError(f"{where}: rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny")
    egress = tuple(parse_egress_rule(r, f"{where}.egress[{i}]", namespace, notes)
                   for i, r in enumerate(_rules(spec, "egress", where)))
    deny = tuple(parse_egress_rule(r, f"{where}.egressDeny[{i}]", namespace, notes, deny=True)
                 for i, r in enumerate(_rules(spec, "egressDeny", where)))
    validate_ingress(spec.get("ingress"), f"{where}.ingress")
    validate_ingress(spec.get("ingressDeny"), f"{where}.ingressDeny")
    raw_default = spec.get("enableDefaultDeny") or {}
    if not isinstance(raw_default, dict):
        raise PolicyError(f"{where}.enableDefaultDeny: expected a mapping with egress and/or ingress")
    only(raw_default, ("egress", "ingress"), f"{where}.enableDefaultDeny")
    default_deny = raw_default.get("egress")
    # Cilium: an egress or egressDeny section makes egress default-deny unless it says otherwise.
    polices = bool(egress or deny) if default_deny is None else bool(default_deny) and bool(egress or deny)
    return Spec(selector, egress, deny, polices)


def _rules(spec: dict[str, Any], key: str, where: str) -> list[Any]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{where}.{key}: expected a list of rules")
    return value


def parse_policy(doc: Any, source: str) -> Policy:
    """One policy document; raises PolicyError naming the policy and the key."""
    if not isinstance(doc, dict):
        raise PolicyError(f"{source}: expected a policy object")
    kind, meta = doc.get("kind"), doc.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, dict) else None
    label = f"{kind or '?'} {name or '?'} ({source})"
    if doc.get("apiVersion") != API_VERSION:
        raise PolicyError(f"{label}: apiVersion must be {API_VERSION}, got {doc.get('apiVersion')!r}")
    if kind not in KINDS:
        raise PolicyError(f"{label}: kind must be one of {', '.join(KINDS)}")
    if not name:
        raise PolicyError(f"{label}: metadata.name is required")
    namespace = None
    if kind == "CiliumNetworkPolicy":
        namespace = str(meta.get("namespace") or "default")
    notes: list[str] = []
    try:
        raw_specs: list[tuple[Any, str]] = []
        if doc.get("spec") is not None:
            raw_specs.append((doc["spec"], "spec"))
        if doc.get("specs") is not None:
            if not isinstance(doc["specs"], list):
                raise PolicyError("specs: expected a list of rules")
            raw_specs += [(s, f"specs[{i}]") for i, s in enumerate(doc["specs"])]
        if not raw_specs:
            raise PolicyError("spec: required (or specs)")
        specs = tuple(_parse_spec(s, w, namespace, notes) for s, w in raw_specs)
    except PolicyError as exc:
        raise PolicyError(f"{label}: {exc}") from None
    return Policy(str(kind), str(name), namespace, specs, source, tuple(notes))


@dataclass
class LoadResult:
    policies: list[Policy] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def load_policy_dir(directory: str | Path) -> LoadResult:
    """Every ``*.yaml``/``*.yml``/``*.json`` file (multi-document) in a directory.

    A bad document is reported and skipped; the rest still load.
    """
    out = LoadResult()
    for path in sorted(Path(directory).iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
            continue
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            out.errors.append(f"{path}: cannot read: {exc}")
            continue
        for i, doc in enumerate(d for d in docs if d is not None):
            try:
                out.policies.append(parse_policy(doc, f"{path.name}#{i}"))
            except PolicyError as exc:
                out.errors.append(str(exc))
    return out
