"""Policies and pods, with the questions the DNS proxy and the datapath loader ask answered."""
from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any

from flowtel.lib.policy.endpoints import EndpointIndex
from flowtel.lib.policy.names import FqdnSelector
from flowtel.lib.policy.pods import Pod
from flowtel.lib.policy.policy import Policy
from flowtel.lib.policy.ports import L4, PortRange
from flowtel.lib.policy.rules import CidrRule, EgressRule, IPNetwork
from flowtel.lib.policy.selectors import Selector
from flowtel.lib.policy.services import Service

# Selects every identity: what the entities ``cluster`` and ``world`` resolve against.
EVERY_ENDPOINT = Selector()
_ANY4, _ANY6 = ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")
_UNKNOWN_ENTITIES = {
    "init": "flowtel has no init identities", "health": "flowtel has no health endpoints",
    "unmanaged": "flowtel does not track unmanaged endpoints", "ingress": "flowtel has no Cilium ingress proxy",
}
# Decisions per view are bounded; a reload builds a new view (and empty caches).
_CACHE_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class NodeAddresses:
    """What the entities ``host``, ``remote-node`` and ``kube-apiserver`` resolve to.

    ``kube_apiserver`` holds the addresses a pod sends API traffic to: the ``kubernetes``
    Service's ClusterIP (the datapath sees the packet before kube-proxy's DNAT) and the
    API server's own endpoint addresses."""

    host: tuple[str, ...] = ()
    remote_nodes: tuple[str, ...] = ()
    kube_apiserver: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CidrEntry:
    network: IPNetwork
    l4: L4 | None  # None: a hole (no rule allows it)
    deny: bool = False  # an egressDeny destination: overrides every allowance, learned names too


@dataclass(frozen=True, slots=True)
class _AnyOf:
    """Matches a name any of ``selectors`` matches (the DNS rules that bind one backend)."""

    selectors: tuple[Any, ...]

    def matches(self, name: str) -> bool:
        return any(s.matches(name) for s in self.selectors)


@dataclass(frozen=True, slots=True)
class _Every:
    """Matches a name every part matches (a Service IP: whichever backend kube-proxy picks)."""

    parts: tuple[_AnyOf, ...]

    def matches(self, name: str) -> bool:
        return all(p.matches(name) for p in self.parts)


@dataclass(slots=True)
class _Dest:
    """A rule's destinations: prefixes, host addresses, and prefixes meaning "outside the cluster"."""

    nets: list[CidrRule]
    hosts: set[str]
    world: list[CidrRule]
    l4: L4 | None


class PolicySet:
    """Policies and pods, with the questions the proxy and the datapath ask answered.

    ``pods`` may hold every node's pods: those on ``node`` (all, when either names no node)
    are this node's, policed when a policy selects them; the others are peers, which only
    ``toEndpoints`` selects. ``endpoints`` is the cluster's index when the caller keeps one
    current (``--kube``); by default it is built from ``pods``. A view is immutable once built:
    the proxy swaps whole views on reload.
    """

    def __init__(self, policies: list[Policy], pods: list[Pod], *, node: str = "",
                 endpoints: EndpointIndex | None = None, nodes: NodeAddresses = NodeAddresses(),
                 services: list[Service] | tuple[Service, ...] = ()) -> None:
        self.policies = policies
        self.node = node
        self.nodes = nodes
        self.services = tuple(services)
        self._service_by_ip = {ip: svc for svc in self.services for ip in svc.cluster_ips}
        self.pods = [p for p in pods if p.on_node(node)]
        self.endpoints = endpoints if endpoints is not None else EndpointIndex(pods)
        self._by_ip = {ip: pod for pod in self.pods for ip in pod.ips}
        self._rules: dict[str, list[EgressRule]] = {}
        self._deny: dict[str, list[EgressRule]] = {}
        self._policed: set[str] = set()
        self.degraded: dict[str, tuple[str, ...]] = {}
        for pol in policies:
            notes = list(pol.notes) + self._resolution_notes(pol)
            if notes:
                self.degraded[pol.ref] = tuple(notes)
        # Replicas share their rules, so their entries: computed once per rule list and
        # endpoint index version.
        self._cidr_cache: dict[tuple[tuple[EgressRule, ...], tuple[EgressRule, ...], int], list[CidrEntry]] = {}
        self._dns_cache: dict[tuple[str, str, str, int, int], bool | None] = {}
        self._bindings: dict[tuple[str, str, int, int], tuple[bool, tuple[Any, ...]] | None] = {}
        self._learners: dict[str, tuple[tuple[tuple[str, ...], L4], ...]] = {}
        for pod in self.pods:
            rules: list[EgressRule] = []
            deny: list[EgressRule] = []
            for pol in policies:
                for spec in pol.selecting_specs(pod):
                    rules.extend(spec.egress)
                    deny.extend(spec.egress_deny)
                    if spec.polices_egress:
                        self._policed.add(pod.key)
            self._rules[pod.key] = rules
            self._deny[pod.key] = deny

    def _unresolvable(self, entity: str) -> str | None:
        """Why ``entity`` cannot be resolved to addresses here (None: it can)."""
        why = _UNKNOWN_ENTITIES.get(entity)
        if entity in ("remote-node", "cluster") and not self.nodes.remote_nodes:
            why = "other nodes' addresses are not known to this proxy"
        if entity == "kube-apiserver" and not self.nodes.kube_apiserver:
            why = "the API server's addresses are not known (no --kube, no --kube-apiserver)"
        return why

    def _resolution_notes(self, pol: Policy) -> list[str]:
        out = []
        for s_i, spec in enumerate(pol.specs):
            where_spec = "spec" if len(pol.specs) == 1 else f"specs[{s_i}]"
            for kind, rules in (("egress", spec.egress), ("egressDeny", spec.egress_deny)):
                for i, rule in enumerate(rules):
                    for svc in self._selected_services(rule):
                        if svc.selector is None:
                            then = "this deny rule denies every destination" if kind == "egressDeny" else \
                                "traffic to it is denied"
                            out.append(f"{where_spec}.{kind}[{i}].toServices: {svc.key}: the endpoints of a Service "
                                       f"without a selector are not known to flowtel; {then}")
                    for e in rule.to_entities:
                        why = self._unresolvable(e)
                        if why is None:
                            continue
                        if kind == "egressDeny":
                            then = "this deny rule denies every destination"
                        elif e == "cluster":
                            then = "only pods and this host are allowed"
                        else:
                            then = "traffic to it is denied"
                        out.append(f"{where_spec}.{kind}[{i}].toEntities: {e}: {why}; {then}")
        return out

    def pod_by_ip(self, ip: str) -> Pod | None:
        return self._by_ip.get(ip)

    def is_policed(self, pod: Pod) -> bool:
        return pod.key in self._policed

    def policed_pods(self) -> list[Pod]:
        return [p for p in self.pods if p.key in self._policed]

    def rules_for(self, pod: Pod) -> list[EgressRule]:
        return self._rules.get(pod.key, [])

    def deny_rules_for(self, pod: Pod) -> list[EgressRule]:
        return self._deny.get(pod.key, [])

    # -- DNS ---------------------------------------------------------------------------------

    def dns_allowed(self, pod: Pod, qname: str) -> bool:
        """Whether a rules.dns pattern of the pod's policies (any resolver) allows ``qname``."""
        return any(s.matches(qname) for r in self.rules_for(pod) for s in r.dns_selectors())

    def dns_verdict(self, pod: Pod, qname: str, resolver: str, port: int, protocol: int) -> bool | None:
        """A policed pod's query for ``qname`` sent to ``resolver``:``port`` over ``protocol``.

        None: no rule allows that resolver on that port and protocol (the datapath drops such
        packets; the proxy never forwards them). Otherwise whether the name is allowed, as
        Cilium's DNS proxy decides: the ``rules.dns`` of every rule whose L3 part selects the
        resolver and whose ports cover the query's; a covering ``toPorts`` item without DNS
        rules (absent or empty) allows every name."""
        key = (pod.key, qname, resolver, port, protocol)
        hit = self._dns_cache.get(key, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        verdict = self._dns_verdict(pod, qname, resolver, port, protocol)
        if len(self._dns_cache) >= _CACHE_ENTRIES:
            self._dns_cache.clear()
        self._dns_cache[key] = verdict
        return verdict

    def _dns_verdict(self, pod: Pod, qname: str, resolver: str, port: int, protocol: int) -> bool | None:
        # Which rules bind this resolver does not depend on the name: computed once per
        # (pod, resolver, port, protocol), so a pod asking ever new names costs a name match each.
        key = (pod.key, resolver, port, protocol)
        binding = self._bindings.get(key, False)
        if binding is False:
            binding = self._dns_binding(pod, resolver, port, protocol)
            if len(self._bindings) >= _CACHE_ENTRIES:
                self._bindings.clear()
            self._bindings[key] = binding
        if binding is None:
            return None
        any_name, selectors = binding  # type: ignore[misc]
        return any_name or any(s.matches(qname) for s in selectors)

    def _dns_binding(self, pod: Pod, resolver: str, port: int,
                     protocol: int) -> tuple[bool, tuple[Any, ...]] | None:
        """None: no rule allows that resolver, port and protocol; else (every name allowed,
        the DNS selectors that apply)."""
        svc = self._service_by_ip.get(resolver)
        if svc is not None:
            # A Service IP (the cluster DNS Service, usually): what every backend would decide,
            # since kube-proxy picks one after the datapath has seen the packet.
            sel = svc.backend_selector()
            sp = next((p for p in svc.ports if p.port == port and p.protocol == protocol), None)
            backends = self.endpoints.addresses(sel) if sel is not None else set()
            if sp is None or sp.target_port is None or not backends:
                return None
            bindings = [self._dns_binding(pod, b, sp.target_port, protocol) for b in sorted(backends)]
            if any(b is None for b in bindings):
                return None
            if all(b[0] for b in bindings):  # type: ignore[index]
                return True, ()
            # A name must be allowed whichever backend answers: the backends' rules that do not
            # allow every name each add their selectors, and a name must match each of them.
            return False, (_Every(tuple(_AnyOf(tuple(b[1])) for b in bindings if not b[0])),)  # type: ignore[index]
        try:
            addr = ipaddress.ip_address(resolver)
        except ValueError:
            return None
        cluster = self._cluster_addresses() if self._uses_world(pod) else set()
        for rule in self.deny_rules_for(pod):
            if _covers(self._dest(rule), resolver, addr, cluster):
                return None
        bound = False
        any_name = False
        selectors: list[FqdnSelector] = []
        for rule in self.rules_for(pod):
            if rule.to_fqdns:
                continue  # learned addresses are not resolvers here (documented difference)
            items = rule.dns_port_rules(port, protocol)
            if not items or not _covers(self._dest(rule), resolver, addr, cluster):
                continue
            bound = True
            for item in items:
                if item.dns is None:
                    any_name = True
                else:
                    selectors.extend(item.dns)
        if not bound:
            return None
        return any_name, tuple(selectors)

    def fqdn_l4(self, pod: Pod, qname: str) -> L4 | None:
        """Ports an answer for ``qname`` opens to its IPs (None: no toFQDNs rule matches)."""
        return L4.union(r.l4() for r in self.rules_for(pod)
                        if not r.blocked and any(s.matches(qname) for s in r.to_fqdns))

    def fqdn_learners(self, qname: str) -> tuple[tuple[tuple[str, ...], L4], ...]:
        """Every policed pod of this node whose ``toFQDNs`` select ``qname``, with the ports an
        answer opens for it: Cilium shares learned addresses by selector across the node's
        endpoints, whichever of them asked."""
        hit = self._learners.get(qname)
        if hit is not None:
            return hit
        out = []
        per_rules: dict[tuple[EgressRule, ...], L4 | None] = {}
        for pod in self.policed_pods():
            rules = tuple(self.rules_for(pod))
            if rules not in per_rules:
                per_rules[rules] = self.fqdn_l4(pod, qname)
            l4 = per_rules[rules]
            if l4 is not None and pod.ips:
                out.append((pod.ips, l4))
        result = tuple(out)
        if len(self._learners) >= _CACHE_ENTRIES:
            self._learners.clear()
        self._learners[qname] = result
        return result

    # -- datapath ----------------------------------------------------------------------------

    def endpoint_selectors(self) -> set[Selector]:
        """Every selector of a policed pod's rules the index must resolve."""
        out: set[Selector] = set()
        for key in self._policed:
            for r in (*self._rules[key], *self._deny[key]):
                out.update(r.to_endpoints)
                for svc in self._selected_services(r):
                    if svc.backend_selector() is not None:
                        out.add(svc.backend_selector())  # type: ignore[arg-type]
                if any(e in ("world", "world-ipv4", "world-ipv6", "cluster") for e in r.to_entities):
                    out.add(EVERY_ENDPOINT)
        if self._policed:
            for svc in self.services:  # ClusterIPs are allowed by what their backends are
                sel = svc.backend_selector()
                if sel is not None and svc.cluster_ips:
                    out.add(sel)
        return out

    def cidr_entries(self, pod: Pod) -> list[CidrEntry]:
        """The pod's L3 allowances and denials as longest-prefix entries.

        Each entry's ports are the union of every rule that covers the whole prefix without
        excepting it, so the longest match alone decides, as the kernel's LPM lookup does.
        ``toEndpoints`` addresses (every node's pods) are host prefixes, checked by set
        membership, so a selector of thousands of pods costs linear time, not quadratic.
        An ``egressDeny`` destination is a deny entry, and so is every allow entry inside it.
        """
        key = (tuple(self.rules_for(pod)), tuple(self.deny_rules_for(pod)), self.endpoints.version)
        entries = self._cidr_cache.get(key)
        if entries is None:
            if len(self._cidr_cache) > 256:  # entries of earlier index versions are stale anyway
                self._cidr_cache.clear()
            cluster = self._cluster_addresses() if self._uses_world(pod) else set()
            allow = [self._dest(r) for r in key[0]]
            deny = [self._dest(r) for r in key[1]]
            entries = _cidr_entries(allow, deny, cluster)
            if self.services:
                entries = self._with_service_ips(entries, allow, deny, cluster)
            self._cidr_cache[key] = entries
        return entries

    def _with_service_ips(self, entries: list[CidrEntry], allow: list[_Dest], deny: list[_Dest],
                          cluster: set[str]) -> list[CidrEntry]:
        """ClusterIP entries: a Service port is allowed when every backend is allowed on its
        target port (and none is denied)."""
        by_net = {e.network: e for e in entries}
        for svc in self.services:
            sel = svc.backend_selector()
            if sel is None or not svc.cluster_ips:
                continue
            backends = self.endpoints.addresses(sel)
            if not backends:
                continue
            addrs = [(b, _host_network(b).network_address) for b in sorted(backends)]
            if any(_covers(d, b, a, cluster) for d in deny for b, a in addrs):
                continue
            ranges = []
            for sp in svc.ports:
                if sp.target_port is None:
                    continue
                if all(any(d.l4 is not None and d.l4.covers(sp.target_port, sp.protocol) and _covers(d, b, a, cluster)
                           for d in allow) for b, a in addrs):
                    ranges.append(PortRange(sp.port, sp.port, sp.protocol))
            if not ranges:
                continue
            for ip in svc.cluster_ips:
                net = _host_network(ip)
                old = by_net.get(net)
                if old is not None and old.deny:
                    continue
                by_net[net] = CidrEntry(net, L4.union([old.l4 if old else None, L4(False, tuple(ranges))]))
        out = list(by_net.values())
        out.sort(key=lambda e: (e.network.version, e.network.prefixlen, int(e.network.network_address)))
        return out

    def _selected_services(self, rule: EgressRule) -> list[Service]:
        if not rule.to_services:
            return []
        return [svc for svc in self.services
                if any(s.matches(svc.namespace, svc.name, dict(svc.labels)) for s in rule.to_services)]

    # -- resolution --------------------------------------------------------------------------

    def _uses_world(self, pod: Pod) -> bool:
        return any(e.startswith("world") for r in (*self.rules_for(pod), *self.deny_rules_for(pod))
                   for e in r.to_entities)

    def _cluster_addresses(self) -> set[str]:
        return (self.endpoints.addresses(EVERY_ENDPOINT) | set(self.nodes.host) | set(self.nodes.remote_nodes))

    def _dest(self, rule: EgressRule) -> _Dest:
        l4 = None if rule.deny else rule.l4()
        if rule.deny and (any(self._unresolvable(e) and e != "cluster" for e in rule.to_entities)
                          or any(s.selector is None for s in self._selected_services(rule))):
            return _Dest([CidrRule(_ANY4), CidrRule(_ANY6)], set(), [], l4)
        if rule.blocked:
            # An allow rule that selects by something unknown allows nothing; a deny rule so
            # blocked denies every destination (never less restrictive than Cilium).
            return _Dest([CidrRule(_ANY4), CidrRule(_ANY6)] if rule.deny else [], set(), [], l4)
        nets = list(rule.to_cidrs)
        hosts: set[str] = set()
        world: list[CidrRule] = []
        for sel in rule.to_endpoints:
            hosts |= self.endpoints.addresses(sel)
        for svc in self._selected_services(rule):
            # Cilium's toServices: the Service's backends (its ClusterIP follows from them).
            backend = svc.backend_selector()
            if backend is not None:
                hosts |= self.endpoints.addresses(backend)
        for e in rule.to_entities:
            if e == "all":
                nets += [CidrRule(_ANY4), CidrRule(_ANY6)]
            elif e == "world":
                world += [CidrRule(_ANY4), CidrRule(_ANY6)]
            elif e == "world-ipv4":
                world.append(CidrRule(_ANY4))
            elif e == "world-ipv6":
                world.append(CidrRule(_ANY6))
            elif e == "cluster":
                hosts |= self._cluster_addresses()
            elif e == "host":
                hosts |= set(self.nodes.host)
            elif e == "remote-node":
                hosts |= set(self.nodes.remote_nodes)
            elif e == "kube-apiserver":
                hosts |= set(self.nodes.kube_apiserver)
        if not rule.has_l3 and (rule.to_ports or rule.icmps or rule.deny):
            # Only ports: any destination on those ports (the DNS rule itself usually).
            nets = [CidrRule(_ANY4), CidrRule(_ANY6)]
        return _Dest(nets, hosts, world, l4)


def _in_net(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, c: CidrRule) -> bool:
    return addr.version == c.network.version and addr in c.network and not any(addr in e for e in c.excepts)


def _covers(d: _Dest, text: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, cluster: set[str]) -> bool:
    if text in d.hosts or any(_in_net(addr, c) for c in d.nets):
        return True
    return text not in cluster and any(_in_net(addr, c) for c in d.world)


def _cidr_entries(allow: list[_Dest], deny: list[_Dest], cluster: set[str]) -> list[CidrEntry]:
    # Endpoint addresses stay strings here (hashing and building ipaddress objects is what
    # would cost at thousands of peers); only CIDRs are networks.
    allow = [d for d in allow if (d.nets or d.hosts or d.world) and d.l4 is not None]
    deny = [d for d in deny if d.nets or d.hosts or d.world]
    dests = allow + deny
    networks = {n for d in dests for c in (*d.nets, *d.world) for n in (c.network, *c.excepts)}
    # A /32 or /128 CIDR and an endpoint address of the same value are one entry.
    host_networks = {str(n.network_address): n for n in networks if n.prefixlen == n.max_prefixlen}
    uses_world = any(d.world for d in dests)
    addresses = set().union(*(d.hosts for d in dests), cluster if uses_world else set()) - host_networks.keys()

    def prefix_covered(prefix: IPNetwork, d: _Dest) -> bool:
        host = str(prefix.network_address)
        if prefix.prefixlen == prefix.max_prefixlen and host in d.hosts:
            return True
        if any(_within(prefix, c.network) and not any(_within(prefix, e) for e in c.excepts) for c in d.nets):
            return True
        if prefix.prefixlen == prefix.max_prefixlen and host in cluster:
            return False
        return any(_within(prefix, c.network) and not any(_within(prefix, e) for e in c.excepts) for c in d.world)

    entries = []
    for prefix in networks:
        if any(prefix_covered(prefix, d) for d in deny):
            entries.append(CidrEntry(prefix, None, True))
            continue
        entries.append(CidrEntry(prefix, L4.union(d.l4 for d in allow if prefix_covered(prefix, d))))
    for text in addresses:
        net = _host_network(text)
        addr = net.network_address
        if any(_covers(d, text, addr, cluster) for d in deny):
            entries.append(CidrEntry(net, None, True))
            continue
        covering = [d.l4 for d in allow if _covers(d, text, addr, cluster)]
        entries.append(CidrEntry(net, covering[0] if len(covering) == 1 else L4.union(covering)))
    entries.sort(key=lambda e: (e.network.version, e.network.prefixlen, int(e.network.network_address)))
    return entries


@functools.lru_cache(maxsize=1 << 17)
def _host_network(ip: str) -> IPNetwork:
    return ipaddress.ip_network(ip)


def _within(inner: IPNetwork, outer: IPNetwork) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]
