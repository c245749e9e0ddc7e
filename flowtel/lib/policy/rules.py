"""Egress rules (``egress`` and ``egressDeny`` items) and Cilium's rule-shape validation.

Validation follows Cilium's ``pkg/policy/api/rule_validation.go``: one kind of L3 selector
per rule ("combining ToEndpoints and ToCIDR is not supported yet"), ``icmps`` never with
``toPorts``, known entities only, port limits (pkg/policy/api/l4.go). What Cilium accepts but
flowtel cannot evaluate (``toGroups``, ``toNodes``, named ports, DNS rules on
other ports than 53, ports beyond the datapath's) does not reject the policy: that part of
the rule allows nothing, and a note naming the field marks the policy degraded. Denying is
never less restrictive than Cilium; un-policing the pods would be.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from flowtel.lib.policy.errors import PolicyError
from flowtel.lib.policy.names import FqdnSelector, parse_fqdn_selector
from flowtel.lib.policy.ports import ALL_PORTS, L4, PortRange, PortRule, parse_icmps, parse_port_rule
from flowtel.lib.policy.selectors import NAMESPACE_LABEL, Requirement, Selector, only, parse_selector

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cilium's EntitySelectorMapping (pkg/policy/api/entity.go).
ENTITIES = ("all", "world", "world-ipv4", "world-ipv6", "cluster", "host", "remote-node", "kube-apiserver",
            "init", "health", "unmanaged", "ingress", "none")
_L3_KEYS = ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toServices", "toGroups", "toNodes", "toFQDNs")
# Fields Cilium enforces that flowtel cannot evaluate: the rule's part they select allows nothing.
_UNEVALUATED = {"toGroups": "cloud provider groups are not known to flowtel",
                "toNodes": "node labels are not known to flowtel",
                "toRequires": "toRequires is deprecated in Cilium and not enforced by flowtel",
                "authentication": "mutual authentication is not enforced by flowtel"}
_RULE_KEYS = (*_L3_KEYS, "toPorts", "icmps", "toRequires", "authentication")


@dataclass(frozen=True, slots=True)
class CidrRule:
    network: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceSelector:
    """One ``toServices`` item: a Service by name, or Services by their labels, in a namespace."""

    namespace: str
    name: str = ""  # k8sService
    selector: Selector | None = None  # k8sServiceSelector

    def matches(self, namespace: str, name: str, labels: dict[str, str]) -> bool:
        if namespace != self.namespace:
            return False
        return name == self.name if self.name else self.selector is not None and self.selector.matches(labels)


@dataclass(frozen=True, slots=True)
class EgressRule:
    """One ``egress`` (or, with ``deny``, ``egressDeny``) item.

    ``blocked``: the rule selects by something flowtel cannot evaluate, so it allows nothing
    (an ``egressDeny`` rule so blocked denies every destination instead)."""

    to_fqdns: tuple[FqdnSelector, ...] = ()
    to_endpoints: tuple[Selector, ...] = ()
    to_cidrs: tuple[CidrRule, ...] = ()
    to_entities: tuple[str, ...] = ()
    to_ports: tuple[PortRule, ...] = ()
    icmps: tuple[PortRange, ...] = ()
    deny: bool = False
    blocked: bool = False
    to_services: tuple[ServiceSelector, ...] = ()

    @property
    def has_l3(self) -> bool:
        return bool(self.to_fqdns or self.to_endpoints or self.to_cidrs or self.to_entities or self.blocked
                    or self.to_services)

    def l4(self) -> L4 | None:
        """The ports the rule covers; None: none (every port item unresolvable)."""
        if self.to_ports:
            parts: list[L4 | None] = []
            for r in self.to_ports:
                if r.any_port:
                    parts.append(ALL_PORTS)
                elif r.ports:
                    parts.append(L4(False, r.ports))
            return L4.union(parts)
        if self.icmps:
            return L4(False, self.icmps)
        return ALL_PORTS

    def dns_selectors(self) -> tuple[FqdnSelector, ...]:
        return tuple(s for r in self.to_ports if r.dns is not None for s in r.dns)

    def dns_port_rules(self, port: int, protocol: int) -> list[PortRule]:
        """The ``toPorts`` items covering (port, protocol); all of them as one when none names ports."""
        if not self.to_ports:
            return [PortRule((), None)] if not self.icmps else []
        return [r for r in self.to_ports if r.any_port or any(p.covers(port, protocol) for p in r.ports)]


def _parse_network(raw: Any, where: str) -> IPNetwork:
    text = str(raw).strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise PolicyError(f"{where}: {raw!r} is not a CIDR") from None


def parse_egress_rule(raw: Any, where: str, namespace: str | None, notes: list[str], *, deny: bool = False) -> EgressRule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping")
    only(raw, _RULE_KEYS if not deny else tuple(k for k in _RULE_KEYS if k != "toFQDNs"), where)
    members = [k for k in _L3_KEYS if raw.get(k)]
    if len(members) > 1:
        raise PolicyError(f"{where}: combining {members[0]} and {members[1]} is not supported yet (Cilium rejects it)")
    if raw.get("icmps") and raw.get("toPorts"):
        raise PolicyError(f"{where}: the ICMPs block may only be present without ToPorts. "
                          "Define a separate rule to use ToPorts")
    blocked = False
    for key, why in _UNEVALUATED.items():
        if raw.get(key):
            blocked = True
            notes.append(f"{where}.{key}: {why}; {'every destination of this deny rule is denied' if deny else 'this rule allows nothing'}")
    fqdns = tuple(parse_fqdn_selector(s, f"{where}.toFQDNs[{i}]") for i, s in enumerate(_list(raw, "toFQDNs", where)))
    endpoints = []
    for i, s in enumerate(_list(raw, "toEndpoints", where)):
        sel = parse_selector(s, f"{where}.toEndpoints[{i}]")
        # In a namespaced policy, endpoint selectors stay in its namespace unless they say otherwise.
        if namespace is not None and not sel.names_key(NAMESPACE_LABEL):
            sel = Selector(sel.requirements + (Requirement(NAMESPACE_LABEL, "In", (namespace,)),))
        endpoints.append(sel)
    cidrs = [CidrRule(_parse_network(c, f"{where}.toCIDR[{i}]")) for i, c in enumerate(_list(raw, "toCIDR", where))]
    for i, c in enumerate(_list(raw, "toCIDRSet", where)):
        w = f"{where}.toCIDRSet[{i}]"
        if not isinstance(c, dict):
            raise PolicyError(f"{w}: expected cidr (and optionally except)")
        only(c, ("cidr", "except", "cidrGroupRef", "cidrGroupSelector"), w)
        if c.get("cidrGroupRef") or c.get("cidrGroupSelector"):
            notes.append(f"{w}: CiliumCIDRGroups are not known to flowtel; "
                         f"{'every destination of this deny rule is denied' if deny else 'this entry allows nothing'}")
            blocked = blocked or deny
            continue
        if "cidr" not in c:
            raise PolicyError(f"{w}: one of cidr, cidrGroupRef, or cidrGroupSelector is required")
        net = _parse_network(c["cidr"], f"{w}.cidr")
        excepts = tuple(_parse_network(e, f"{w}.except[{j}]") for j, e in enumerate(c.get("except") or []))
        for e in excepts:
            if e.version != net.version or not e.subnet_of(net):  # type: ignore[arg-type]
                raise PolicyError(f"{w}.except: allow CIDR prefix {net} does not contain exclude CIDR prefix {e}")
        cidrs.append(CidrRule(net, excepts))
    entities = []
    for i, e in enumerate(_list(raw, "toEntities", where)):
        if str(e) not in ENTITIES:
            raise PolicyError(f"{where}.toEntities[{i}]: unsupported entity: {e} (one of {', '.join(ENTITIES)})")
        entities.append(str(e))
    services = []
    for i, s in enumerate(_list(raw, "toServices", where)):
        w = f"{where}.toServices[{i}]"
        if not isinstance(s, dict):
            raise PolicyError(f"{w}: expected k8sService or k8sServiceSelector")
        only(s, ("k8sService", "k8sServiceSelector"), w)
        if ("k8sService" in s) == ("k8sServiceSelector" in s):
            raise PolicyError(f"{w}: exactly one of k8sService and k8sServiceSelector is required")
        if "k8sService" in s:
            ref = s["k8sService"]
            if not isinstance(ref, dict) or not ref.get("serviceName"):
                raise PolicyError(f"{w}.k8sService: expected serviceName (and namespace)")
            only(ref, ("serviceName", "namespace"), f"{w}.k8sService")
            services.append(ServiceSelector(str(ref.get("namespace") or namespace or "default"), str(ref["serviceName"])))
        else:
            ref = s["k8sServiceSelector"]
            if not isinstance(ref, dict) or "selector" not in ref:
                raise PolicyError(f"{w}.k8sServiceSelector: expected selector (and namespace)")
            only(ref, ("selector", "namespace"), f"{w}.k8sServiceSelector")
            sel = parse_selector(ref["selector"], f"{w}.k8sServiceSelector.selector")
            services.append(ServiceSelector(str(ref.get("namespace") or namespace or "default"), selector=sel))
    ports = tuple(parse_port_rule(p, f"{where}.toPorts[{i}]", notes) for i, p in enumerate(_list(raw, "toPorts", where)))
    if deny and any(r.dns is not None for r in ports):
        raise PolicyError(f"{where}.toPorts: egressDeny takes no L7 rules")
    if deny and ports:
        notes.append(f"{where}.toPorts: flowtel denies every port of this deny rule's destinations "
                     "(a deny limited to ports is enforced as a deny of the destination)")
    icmps = parse_icmps(raw["icmps"], f"{where}.icmps") if raw.get("icmps") else ()
    if deny and icmps:
        notes.append(f"{where}.icmps: flowtel denies all traffic to this deny rule's destinations, not only ICMP")
    return EgressRule(fqdns, tuple(endpoints), tuple(cidrs), tuple(entities), ports, icmps, deny, blocked,
                      tuple(services))


def validate_ingress(raw: Any, where: str) -> None:
    """Ingress is not enforced by flowtel, but Cilium's checks that concern DNS still apply."""
    if raw is None:
        return
    if not isinstance(raw, list):
        raise PolicyError(f"{where}: expected a list of rules")
    for i, rule in enumerate(raw):
        if not isinstance(rule, dict):
            raise PolicyError(f"{where}[{i}]: expected a mapping")
        for j, pr in enumerate(rule.get("toPorts") or []):
            if isinstance(pr, dict) and isinstance(pr.get("rules"), dict) and pr["rules"].get("dns"):
                raise PolicyError(f"{where}[{i}].toPorts[{j}]: DNS rules are not allowed on ingress")


def _list(raw: dict[str, Any], key: str, where: str) -> list[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise PolicyError(f"{where}.{key}: expected a list")
    return value
