"""From observed flows to the least-privilege CiliumNetworkPolicy that allows them.

Input is Hubble-shaped flow records (the agent's flow API, a flow-log file); output is one
``cilium.io/v2`` CiliumNetworkPolicy as plain data, with provenance for every rule and
entry. What counts as the workload's egress:

- a packet flow (L3/L4; not a TCP event, not a non-IP frame) whose **source** is one of the
  selected pods and whose source is the client of the exchange (``is_reply`` false, else
  :func:`flowtel.servicegraph.source_is_client`): replies, and traffic a peer initiated,
  are not egress the workload made;
- seen at the pod's own interface (``traffic_direction`` EGRESS) or at an unknown point.
  The INGRESS copy of the same packets, counted at a local peer's interface, is skipped
  so nothing is counted twice;
- with verdict FORWARDED or AUDIT (audit mode reports what a policy would have dropped),
  and DROPPED only when asked: a suggestion should not normally widen what already failed.

DNS comes from the L7 flows: queries the pods sent (names, server, UDP/TCP) and the answers
they received (which IPs each name resolved to, following CNAMEs as the answer's ``ips``
already do). An external address the workload connected to is "reached by name" when it
appears in one of those answers (or in the flow's ``destination_names``).

The rules, in this order, each kind its own rule because Cilium rejects a rule that mixes
L3 selector kinds (``toEndpoints`` with ``toFQDNs``, …):

1. DNS: ``toEndpoints`` (the DNS server pods: labels and namespace; ``toCIDR`` for a server
   that is not a pod) on port 53 UDP (and TCP where seen), ``rules.dns`` listing each name
   queried, answered or not (a REFUSED search-domain expansion stops a glibc resolver's
   search, so a name that failed must stay resolvable to fail the same way).
2. ``toFQDNs`` for external destinations reached by name.
3. ``toEndpoints`` for destinations that are pods.
4. ``toCIDR`` (/32, /128) for everything else reached without a name.

Destinations with the same set of ports share one rule, so each rule allows exactly the
observed (destination, port) pairs and no cross product beyond them. Everything is sorted:
the same flows give the same policy, byte for byte.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import re2

# The policy subset flowtel enforces: its API version, namespace label and the port ranges
# the datapath keeps per destination.
from flowtel.lib.policy import API_VERSION, MAX_PORTS, NAMESPACE_LABEL
from flowtel.hubble import DNS_RCODE_NAMES, format_time
from flowtel.labelselector import Requirement, parse_labels, parse_selector, selector_matches
from flowtel.records import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Endpoint,
    Flow,
    FlowType,
    LostEvents,
    Record,
    TrafficDirection,
    Verdict,
)
from flowtel.servicegraph import source_is_client
from processors.k8sattributes.identity import is_identity_label

KIND = "CiliumNetworkPolicy"
# Cilium's own labels on an endpoint (namespace labels, service account, cluster): policies
# can name them in Cilium, but flowtel's DNS proxy selects pods by their Kubernetes labels
# only, so a selector using them would never select anything there.
_CILIUM_LABEL_PREFIX = "io.cilium.k8s."
ANNOTATION_PREFIX = "policy.flowtel.io/"
# receiver/ebpf/dns.py EXTENSION_UNANSWERED: the flow repeating a query that got no answer.
EXTENSION_UNANSWERED = "dns_unanswered"
DNS_PORT = 53

_PROTOCOL_NAMES = {IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_SCTP: "SCTP"}
_UNPORTED_NAMES = {IPPROTO_ICMP: "ICMPv4", IPPROTO_ICMPV6: "ICMPv6"}
# Cilium's FQDN patterns (api/v1/policy/api/fqdn.go) and DNS's length limit. These run on
# names a workload queried (hostile input): RE2, linear in the name, as Go's regexp is in
# Cilium (Python's re backtracks exponentially on this one: "a"*30 + "!").
_MATCH_NAME = re2.compile(r"^([-a-zA-Z0-9_]+[.]?)+$")
_MAX_NAME = 253
_DNS1123_LABEL = re.compile(r"[^a-z0-9.-]+")
# A Kubernetes object name (DNS-1123 subdomain).
_OBJECT_NAME = re2.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class SuggestError(ValueError):
    """A selection or input from which no policy can be written; the message says why."""


# -- selection ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Selection:
    """Which pods the policy is for: one namespace, and a workload, a pod-name prefix or a
    label selector (``flowtel observe --label`` syntax), at least one of them."""

    namespace: str
    workload: str = ""  # NAME or KIND/NAME of the pods' top-level workload
    pod: str = ""  # pod name prefix
    label: str = ""
    _requirements: tuple[Requirement, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.namespace:
            raise SuggestError("--namespace: the policy is namespaced; name the workload's namespace")
        if not (self.workload or self.pod or self.label):
            raise SuggestError("select the pods: --workload NAME, --pod PREFIX or --label SELECTOR")
        if self.workload.count("/") > 1 or self.workload.startswith("/") or self.workload.endswith("/"):
            raise SuggestError(f"--workload: expected NAME or KIND/NAME (e.g. Deployment/web), got {self.workload!r}")
        if self.label:
            try:
                object.__setattr__(self, "_requirements", tuple(parse_selector(self.label)))
            except ValueError as exc:
                raise SuggestError(f"--label: {exc}") from None

    def matches(self, ep: Endpoint | None) -> bool:
        if ep is None or not ep.pod_name or ep.namespace != self.namespace:
            return False
        if self.pod and not ep.pod_name.startswith(self.pod):
            return False
        if self.workload:
            kind, _, name = self.workload.rpartition("/")
            top = ep.workloads[0] if ep.workloads else None
            if top is None or top.name != name or (kind and top.kind.lower() != kind.lower()):
                return False
        if self._requirements and not selector_matches(list(self._requirements), parse_labels(ep.labels)):
            return False
        return True

    def describe(self) -> str:
        parts = [f"namespace {self.namespace}"]
        if self.workload:
            parts.append(f"workload {self.workload}")
        if self.pod:
            parts.append(f"pods {self.pod}*")
        if self.label:
            parts.append(f"label {self.label}")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Options:
    collapse: int = 0  # N >= 2: N or more sibling names become "*.parent"; 0: never
    include_dropped: bool = False
    name: str = ""  # metadata.name; default: the workload's name
    source: str = ""  # where the flows came from, for the provenance annotation

    def __post_init__(self) -> None:
        if self.collapse == 1 or self.collapse < 0:
            raise SuggestError("--collapse: expected N >= 2 sibling names (or 0: never collapse); "
                               "1 would widen every name to its parent domain")
        if self.name and not _valid_object_name(self.name):
            raise SuggestError(f"--name: {self.name!r} is not a Kubernetes object name "
                               "(lowercase letters, digits, '-' and '.', at most 253)")


# -- observations ------------------------------------------------------------------------

@dataclass(slots=True)
class Stats:
    """How often something was seen: flow records, packets and bytes, first and last time."""

    flows: int = 0
    packets: int = 0
    bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0

    def add(self, flow: Flow) -> None:
        self.flows += 1
        self.packets += flow.packets
        self.bytes += flow.bytes
        t = flow.time_ns
        self.first_ns = t if not self.first_ns or t < self.first_ns else self.first_ns
        self.last_ns = max(self.last_ns, t)

    def merge(self, other: Stats) -> None:
        if not other.flows:
            return
        self.flows += other.flows
        self.packets += other.packets
        self.bytes += other.bytes
        self.first_ns = other.first_ns if not self.first_ns else min(self.first_ns, other.first_ns)
        self.last_ns = max(self.last_ns, other.last_ns)

    def window(self) -> str:
        return f"first {_when(self.first_ns)}, last {_when(self.last_ns)}"


Port = tuple[str, int]  # ("TCP", 443)
Labels = tuple[tuple[str, str], ...]  # sorted matchLabels


@dataclass(frozen=True, slots=True, order=True)
class Destination:
    """One thing a rule names: a pod selector, a DNS name, or a CIDR."""

    kind: str  # "endpoints" | "fqdn" | "cidr"
    value: str  # name or CIDR; for endpoints the selector rendered as text (for sorting)
    labels: Labels = ()


@dataclass(slots=True)
class _DnsName:
    queries: Stats = field(default_factory=Stats)  # REQUEST flows the pods sent
    answers: Stats = field(default_factory=Stats)  # RESPONSE flows they received
    rcodes: set[str] = field(default_factory=set)

    def window(self) -> str:
        both = Stats()
        both.merge(self.queries)
        both.merge(self.answers)
        return both.window()


@dataclass(slots=True)
class _Observed:
    pods: dict[str, dict[str, str]] = field(default_factory=dict)  # selected pod -> stable labels
    workloads: set[tuple[str, str]] = field(default_factory=set)
    others: dict[str, dict[str, str]] = field(default_factory=dict)  # other pods of the namespace
    egress: dict[Destination, dict[Port, Stats]] = field(default_factory=dict)
    # DNS servers (pod selector or CIDR) -> protocol -> stats; names asked of each server.
    dns_servers: dict[Destination, dict[str, Stats]] = field(default_factory=dict)
    dns_server_names: dict[Destination, set[str]] = field(default_factory=dict)
    dns_names: dict[str, _DnsName] = field(default_factory=dict)
    answers: dict[str, set[str]] = field(default_factory=dict)  # IP -> names it answered
    pending: list[tuple[Flow, Port]] = field(default_factory=list)  # egress not yet classified
    dest_pods: dict[Destination, set[str]] = field(default_factory=dict)  # pod selector -> ns/pod seen
    unported: dict[tuple[str, str], Stats] = field(default_factory=dict)  # (protocol, dst) -> stats
    bad_names: dict[str, int] = field(default_factory=dict)
    unusable: dict[str, int] = field(default_factory=dict)  # why a flow of the selection was left out -> count
    flows_read: int = 0
    flows_used: int = 0
    lost: int = 0
    first_ns: int = 0
    last_ns: int = 0

    def skip(self, reason: str) -> None:
        self.unusable[reason] = self.unusable.get(reason, 0) + 1

    def used(self, flow: Flow) -> None:
        self.flows_used += 1
        self.first_ns = flow.time_ns if not self.first_ns else min(self.first_ns, flow.time_ns)
        self.last_ns = max(self.last_ns, flow.time_ns)


def stable_labels(ep: Endpoint) -> dict[str, str]:
    """The endpoint's Kubernetes labels a selector can rely on: Cilium's identity labels
    (no ``pod-template-hash`` or other per-pod keys), without Cilium's own
    ``io.cilium.k8s.*`` labels, the namespace label and non-Kubernetes sources."""
    out: dict[str, str] = {}
    for source, key, value in parse_labels(ep.labels):
        if source not in ("k8s", "") or not key:
            continue
        if key == NAMESPACE_LABEL or key.startswith(_CILIUM_LABEL_PREFIX) or not is_identity_label(key):
            continue
        out[key] = value
    return out


def _pod_destination(ep: Endpoint) -> Destination:
    labels = dict(stable_labels(ep))
    labels[NAMESPACE_LABEL] = ep.namespace
    items = tuple(sorted(labels.items()))
    return Destination("endpoints", ",".join(f"{k}={v}" for k, v in items), items)


def _cidr_destination(ip: str) -> Destination:
    addr = ipaddress.ip_address(ip)
    return Destination("cidr", f"{addr}/{addr.max_prefixlen}")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _canonical(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _valid_name(name: str) -> bool:
    return bool(name) and len(name) <= _MAX_NAME and ".." not in name and _MATCH_NAME.match(name) is not None


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _allowed_verdicts(options: Options) -> frozenset[Verdict]:
    verdicts = {Verdict.FORWARDED, Verdict.AUDIT}
    if options.include_dropped:
        verdicts.add(Verdict.DROPPED)
    return frozenset(verdicts)


def _observe(records: Iterable[Record], selection: Selection, options: Options) -> _Observed:
    obs = _Observed()
    verdicts = _allowed_verdicts(options)
    for record in records:
        if isinstance(record, LostEvents):
            obs.lost += record.count
            continue
        if not isinstance(record, Flow):
            continue
        obs.flows_read += 1
        flow = record
        src_selected = selection.matches(flow.source)
        dst_selected = selection.matches(flow.destination)
        for ep, selected in ((flow.source, src_selected), (flow.destination, dst_selected)):
            if ep is None or not ep.pod_name:
                continue
            if selected:
                obs.pods[ep.pod_name] = stable_labels(ep)
                if ep.workloads:
                    obs.workloads.add((ep.workloads[0].kind, ep.workloads[0].name))
            elif ep.namespace == selection.namespace:
                obs.others[ep.pod_name] = stable_labels(ep)
        if flow.verdict not in verdicts or flow.ip_version not in (4, 6):
            continue
        if flow.l7 is not None:
            _observe_dns(obs, flow, src_selected, dst_selected)
            continue
        if (not src_selected or flow.flow_type != FlowType.L3_L4 or "tcp_event" in flow.extensions
                or flow.traffic_direction == TrafficDirection.INGRESS or not source_is_client(flow)):
            continue
        if not _is_address(flow.dst_ip):
            obs.skip("destination address is not an IP address")
            continue
        proto = _PROTOCOL_NAMES.get(flow.protocol)
        if proto is not None and flow.dst_port == 0:
            # Port 0 in a policy means every port: never write it for a flow that lacks one.
            obs.skip(f"{proto} without a destination port")
            continue
        if proto is None:
            label = _UNPORTED_NAMES.get(flow.protocol, f"IP protocol {flow.protocol}")
            obs.unported.setdefault((label, flow.dst_ip), Stats()).add(flow)
            obs.used(flow)
            continue
        obs.pending.append((flow, (proto, flow.dst_port)))
        obs.used(flow)
    return obs


def _observe_dns(obs: _Observed, flow: Flow, src_selected: bool, dst_selected: bool) -> None:
    dns = flow.l7
    assert dns is not None
    response = flow.l7_type == "RESPONSE" or (not flow.l7_type and bool(flow.is_reply))
    if response:
        if not dst_selected:
            return
        server_ep, server_ip, proto_port = flow.source, flow.src_ip, flow.src_port
    else:
        if not src_selected or flow.traffic_direction == TrafficDirection.INGRESS:
            return
        server_ep, server_ip, proto_port = flow.destination, flow.dst_ip, flow.dst_port
    proto = _PROTOCOL_NAMES.get(flow.protocol)
    if proto not in ("UDP", "TCP") or proto_port != DNS_PORT:
        return  # rules.dns applies to port 53 only (Cilium's DNS proxy, flowtel's)
    if not _is_address(server_ip):
        obs.skip("DNS server address is not an IP address")
        return
    name = _normalize(dns.query)
    if not _valid_name(name):
        # A name no policy can carry (the root, spaces, non-ASCII): counted and reported.
        obs.bad_names[dns.query] = obs.bad_names.get(dns.query, 0) + 1
        return
    server = _destination_of(obs, server_ep, server_ip)
    entry = obs.dns_names.setdefault(name, _DnsName())
    obs.dns_server_names.setdefault(server, set()).add(name)
    obs.used(flow)
    server_stats = obs.dns_servers.setdefault(server, {}).setdefault(proto, Stats())
    if response:
        entry.answers.add(flow)
        entry.rcodes.add(DNS_RCODE_NAMES.get(dns.rcode, f"RCODE {dns.rcode}"))
        for ip in dns.ips:
            if _is_address(ip):
                obs.answers.setdefault(_canonical(ip), set()).add(name)
            else:
                obs.skip("DNS answer address is not an IP address")
    elif flow.extensions.get(EXTENSION_UNANSWERED):
        # The receiver's second copy of a query that got no answer: not a query of its own.
        entry.rcodes.add("unanswered")
    else:
        entry.queries.add(flow)
        server_stats.add(flow)


def _destination_of(obs: _Observed, ep: Endpoint | None, ip: str) -> Destination:
    """A pod's selector (remembering which pods stand behind it), else the address as a CIDR."""
    if ep is None or not ep.pod_name:
        return _cidr_destination(ip)
    dest = _pod_destination(ep)
    obs.dest_pods.setdefault(dest, set()).add(f"{ep.namespace}/{ep.pod_name}")
    return dest


def _classify(obs: _Observed) -> None:
    """Egress packet flows into DNS servers, pods, names and CIDRs, now that every DNS answer
    in the input is known (an aggregated flow can be drained before the answer that led to it)."""
    for flow, port in obs.pending:
        proto, number = port
        dst = flow.destination
        if number == DNS_PORT and proto in ("UDP", "TCP"):
            server = _destination_of(obs, dst, flow.dst_ip)
            obs.dns_servers.setdefault(server, {}).setdefault(proto, Stats())
            obs.dns_server_names.setdefault(server, set())
            continue
        if dst is not None and dst.pod_name:
            targets = [_destination_of(obs, dst, flow.dst_ip)]
        else:
            names = set(obs.answers.get(_canonical(flow.dst_ip), ()))
            names.update(n for n in map(_normalize, flow.destination_names) if _valid_name(n))
            targets = [Destination("fqdn", n) for n in sorted(names)] or [_cidr_destination(flow.dst_ip)]
        for target in targets:
            obs.egress.setdefault(target, {}).setdefault(port, Stats()).add(flow)
    obs.pending.clear()


# -- names -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NameEntry:
    """A ``matchName`` or a collapsed ``matchPattern`` and the names it stands for."""

    pattern: bool
    value: str
    members: tuple[str, ...]

    def selector(self) -> dict[str, str]:
        return {"matchPattern": self.value} if self.pattern else {"matchName": self.value}


def collapse_names(names: Iterable[str], threshold: int) -> list[NameEntry]:
    """``matchName`` per name; with ``threshold`` >= 2, ``threshold`` or more names one label
    below the same parent become ``matchPattern: "*.parent"`` (Cilium: ``*`` stays within one
    label). The parent must have two labels or more, so ``*.com`` is never written."""
    unique = sorted(set(names))
    entries: list[NameEntry] = []
    taken: set[str] = set()
    if threshold >= 2:
        siblings: dict[str, list[str]] = {}
        for name in unique:
            _, dot, parent = name.partition(".")
            if dot and "." in parent:
                siblings.setdefault(parent, []).append(name)
        for parent, members in siblings.items():
            if len(members) >= threshold:
                entries.append(NameEntry(True, f"*.{parent}", tuple(members)))
                taken.update(members)
    entries.extend(NameEntry(False, n, (n,)) for n in unique if n not in taken)
    return sorted(entries, key=lambda e: (e.value.lstrip("*."), e.pattern, e.value))


# -- ports -------------------------------------------------------------------------------

def port_entries(ports: Iterable[Port]) -> list[dict[str, Any]]:
    """``toPorts[].ports`` for a set of (protocol, port): one entry per port, sorted; runs of
    consecutive ports become ``endPort`` ranges only when there are more than the datapath's
    :data:`MAX_PORTS`, which keeps the common case readable and the large case enforceable."""
    ordered = sorted(set(ports), key=lambda p: (p[1], p[0]))
    if len(ordered) <= MAX_PORTS:
        return [{"port": str(n), "protocol": proto} for proto, n in ordered]
    by_proto: dict[str, list[int]] = {}
    for proto, n in ordered:
        by_proto.setdefault(proto, []).append(n)
    ranges: list[tuple[int, int, str]] = []
    for proto, numbers in by_proto.items():
        start = prev = numbers[0]
        for n in numbers[1:]:
            if n != prev + 1:
                ranges.append((start, prev, proto))
                start = n
            prev = n
        ranges.append((start, prev, proto))
    out: list[dict[str, Any]] = []
    for start, end, proto in sorted(ranges):
        entry: dict[str, Any] = {"port": str(start), "protocol": proto}
        if end != start:
            entry["endPort"] = end
        out.append(entry)
    return out


def _to_ports(ports: Iterable[Port], warnings: list[str], what: str) -> list[dict[str, Any]]:
    entries = port_entries(ports)
    if len(entries) > MAX_PORTS:
        warnings.append(f"{what}: {len(entries)} port ranges; flowtel's datapath enforces at most {MAX_PORTS} "
                        "per destination (Cilium takes them all)")
    # One toPorts item per MAX_PORTS entries: the proxy's parser takes at most that many per item.
    return [{"ports": entries[i:i + MAX_PORTS]} for i in range(0, len(entries), MAX_PORTS)]


# -- the policy --------------------------------------------------------------------------

Path = tuple[str | int, ...]


@dataclass(slots=True)
class Suggestion:
    """The policy document, comments for the YAML rendering keyed by the path of the list
    item they describe, the lines above the document, and warnings for the user."""

    policy: dict[str, Any]
    comments: dict[Path, str]
    header: list[str]
    warnings: list[str]
    flows_read: int
    flows_used: int


def _n(count: int, word: str, plural: str = "") -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _when(ns: int) -> str:
    return format_time(ns - ns % 1_000_000_000) if ns else "-"


def _valid_object_name(name: str) -> bool:
    return 0 < len(name) <= 253 and _OBJECT_NAME.fullmatch(name) is not None


def _policy_name(selection: Selection, obs: _Observed, options: Options) -> str:
    if options.name:
        return options.name
    if selection.workload:
        raw = selection.workload.rpartition("/")[2]
    elif len(obs.workloads) == 1:
        raw = next(iter(obs.workloads))[1]
    elif selection.pod:
        raw = selection.pod
    else:
        raw = min(obs.pods)
    name = _DNS1123_LABEL.sub("-", raw.lower()).strip("-.")[:253].strip("-.")
    if not _valid_object_name(name):
        raise SuggestError(f"cannot derive a policy name from {raw!r}; give one with --name")
    return name


def _endpoint_selector(obs: _Observed, selection: Selection, warnings: list[str]) -> dict[str, str]:
    label_sets = list(obs.pods.values())
    common = dict(set.intersection(*(set(s.items()) for s in label_sets))) if label_sets else {}
    if not common:
        raise SuggestError(
            f"the selected pods ({', '.join(sorted(obs.pods))}) share no label, so no endpointSelector "
            "selects exactly them; select pods that share their workload's labels")
    also = sorted(p for p, labels in obs.others.items() if common.items() <= labels.items())
    if also:
        warnings.append(f"endpointSelector {_render_labels(common)} also selects pods outside the selection "
                        f"that were seen in the flows: {', '.join(selection.namespace + '/' + p for p in also)}")
    return dict(sorted(common.items()))


def _render_labels(labels: dict[str, str] | Labels) -> str:
    items = labels.items() if isinstance(labels, dict) else labels
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(items)) + "}"


def _selector(dest: Destination) -> dict[str, Any]:
    return {"matchLabels": dict(dest.labels)}


def _dest_comment(ports: dict[Port, Stats]) -> str:
    parts = []
    for (proto, number), st in sorted(ports.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        parts.append(f"{proto}/{number}: {_n(st.flows, 'flow')}, {_n(st.packets, 'packet')}, {_n(st.bytes, 'byte')}, "
                     f"{st.window()}")
    return "; ".join(parts)


def _dns_name_comment(entry: NameEntry, names: dict[str, _DnsName]) -> str:
    lines = []
    for member in entry.members:
        info = names[member]
        answer = "/".join(sorted(info.rcodes)) if info.rcodes else "no answer seen"
        lines.append(f"{member}: {_n(info.queries.flows, 'query', 'queries')} ({answer}), {info.window()}")
    if entry.pattern:
        lines.insert(0, f"collapses {len(entry.members)} sibling names (--collapse):")
    return "\n".join(lines)


def _group_by_ports(items: dict[Destination, dict[Port, Stats]]) -> list[tuple[frozenset[Port], list[Destination]]]:
    groups: dict[frozenset[Port], list[Destination]] = {}
    for dest, ports in items.items():
        groups.setdefault(frozenset(ports), []).append(dest)
    out = [(ports, sorted(dests)) for ports, dests in groups.items()]
    return sorted(out, key=lambda g: (sorted((p[1], p[0]) for p in g[0]), g[1]))


@dataclass(slots=True)
class _Rule:
    """One egress rule, the line that summarises it, and comments keyed below the rule."""

    body: dict[str, Any]
    summary: str
    comments: dict[Path, str]


def _dns_rules(obs: _Observed, options: Options, warnings: list[str]) -> list[_Rule]:
    """One rule per kind of server (pods, addresses) and set of protocols asked over."""
    groups: dict[tuple[str, frozenset[str]], list[Destination]] = {}
    for server, protos in obs.dns_servers.items():
        groups.setdefault((server.kind, frozenset(protos)), []).append(server)
    rules = []
    for (kind, protos), servers in sorted(groups.items(), key=lambda kv: (kv[0][0], sorted(kv[0][1]), sorted(kv[1]))):
        servers.sort()
        names = sorted(set().union(*(obs.dns_server_names.get(s, set()) for s in servers)))
        entries = collapse_names(names, options.collapse)
        key = "toEndpoints" if kind == "endpoints" else "toCIDR"
        ports = [{"port": str(DNS_PORT), "protocol": p} for p in sorted(protos, key=lambda p: p != "UDP")]
        body: dict[str, Any] = {key: [_selector(s) if kind == "endpoints" else s.value for s in servers],
                                "toPorts": [{"ports": ports, "rules": {"dns": [e.selector() for e in entries]}}]}
        comments: dict[Path, str] = {}
        for i, server in enumerate(servers):
            st = Stats()
            for proto_stats in obs.dns_servers[server].values():
                st.merge(proto_stats)
            who = ", ".join(sorted(obs.dest_pods.get(server, ()))) or server.value
            comments[(key, i)] = f"DNS server {who}: {_n(st.flows, 'query', 'queries')}, {st.window()}"
        for i, entry in enumerate(entries):
            comments[("toPorts", 0, "rules", "dns", i)] = _dns_name_comment(entry, obs.dns_names)
        if not names:
            warnings.append(f"DNS traffic to {', '.join(s.value for s in servers)} without any decoded query: "
                            "its rules.dns list is empty, which allows no name")
        queries = sum(obs.dns_names[n].queries.flows for n in names)
        summary = (f"DNS: {_n(len(names), 'name')}, {_n(queries, 'query', 'queries')} over "
                   f"{'/'.join(sorted(protos))} to {_n(len(servers), 'server')}")
        rules.append(_Rule(body, summary, comments))
    return rules


def _destination_rules(obs: _Observed, kind: str, options: Options, warnings: list[str]) -> list[_Rule]:
    """``toFQDNs``, ``toEndpoints`` or ``toCIDR`` rules: one per set of ports."""
    key = {"fqdn": "toFQDNs", "endpoints": "toEndpoints", "cidr": "toCIDR"}[kind]
    of_kind = {d: p for d, p in obs.egress.items() if d.kind == kind}
    rules = []
    for ports, dests in _group_by_ports(of_kind):
        comments: dict[Path, str] = {}
        items: list[Any]
        if kind == "fqdn":
            entries = collapse_names([d.value for d in dests], options.collapse)
            items = [e.selector() for e in entries]
            for i, e in enumerate(entries):
                lines = [f"{m}: {_dest_comment(of_kind[Destination('fqdn', m)])}" for m in e.members]
                if e.pattern:
                    lines.insert(0, f"collapses {len(e.members)} sibling names (--collapse):")
                comments[(key, i)] = "\n".join(lines)
            what = _n(len(entries), "name")
        elif kind == "endpoints":
            items = [_selector(d) for d in dests]
            for i, d in enumerate(dests):
                comments[(key, i)] = f"{', '.join(sorted(obs.dest_pods.get(d, ())))}: {_dest_comment(of_kind[d])}"
                if len(d.labels) == 1:
                    warnings.append(f"a destination pod in namespace {dict(d.labels)[NAMESPACE_LABEL]} has no labels: "
                                    "its toEndpoints selector allows every pod of that namespace")
            what = _n(len(dests), "pod selector")
        else:
            items = [d.value for d in dests]
            for i, d in enumerate(dests):
                comments[(key, i)] = _dest_comment(of_kind[d])
            what = _n(len(dests), "address", "addresses") + " reached without a DNS name"
        body = {key: items, "toPorts": _to_ports(ports, warnings, f"{key} {', '.join(d.value for d in dests)}")}
        port_text = ", ".join(f"{p}/{n}" for p, n in sorted(ports, key=lambda x: (x[1], x[0])))
        rules.append(_Rule(body, f"{key}: {what} on {port_text}", comments))
    return rules


def _input_warnings(obs: _Observed) -> list[str]:
    """What was seen but is not in the policy, and what the input says it lost."""
    warnings = []
    for (label, dst), st in sorted(obs.unported.items()):
        warnings.append(f"{label} to {dst} ({_n(st.flows, 'flow')}) is not allowed by this policy: flowtel's policy "
                        "subset has no ICMP rules and a rule without ports would allow every port")
    for bad, count in sorted(obs.bad_names.items()):
        warnings.append(f"DNS query {bad!r} ({_n(count, 'flow')}) is not a name a policy can hold; left out")
    for reason, count in sorted(obs.unusable.items()):
        warnings.append(f"{_n(count, 'flow')} of the selected pods left out: {reason}")
    if obs.lost:
        warnings.append(f"the input reports {obs.lost} lost flow records: the policy may miss what they carried")
    return warnings


def suggest(records: Iterable[Record], selection: Selection, options: Options | None = None) -> Suggestion:
    """The least-privilege policy for the selected pods' observed egress (see the module doc).

    Raises :class:`SuggestError` when no flow of the selection is in ``records`` or no
    endpointSelector can select exactly the selected pods.
    """
    options = options or Options()
    obs = _observe(records, selection, options)
    _classify(obs)
    if not obs.pods:
        raise SuggestError(f"no flows of the selected pods ({selection.describe()}) in the input; "
                           "check the selection, or widen --since")
    warnings: list[str] = []
    name = _policy_name(selection, obs, options)
    selector = _endpoint_selector(obs, selection, warnings)
    rules = _dns_rules(obs, options, warnings)
    for kind in ("fqdn", "endpoints", "cidr"):
        rules.extend(_destination_rules(obs, kind, options, warnings))
    warnings.extend(_input_warnings(obs))

    egress: list[dict[str, Any]] = []
    comments: dict[Path, str] = {}
    for index, rule in enumerate(rules):
        egress.append(rule.body)
        comments[("spec", "egress", index)] = rule.summary
        for sub, text in rule.comments.items():
            comments[("spec", "egress", index, *sub)] = text
    if not egress:
        # Cilium and flowtel's proxy both read one empty rule as "deny all egress"; an empty
        # list would leave egress unpoliced in Cilium.
        warnings.append("the selected pods made no egress in the input: the policy denies all their egress")
        egress.append({})

    workloads = ", ".join(f"{k} {n}" if k else n for k, n in sorted(obs.workloads)) or "no workload"
    observed = (f"{_n(obs.flows_used, 'flow')} of {selection.namespace} {workloads} (pods {', '.join(sorted(obs.pods))}), "
                f"{_when(obs.first_ns)} to {_when(obs.last_ns)}")
    annotations = {f"{ANNOTATION_PREFIX}generated-by": "flowtel policy suggest",
                   f"{ANNOTATION_PREFIX}observed": observed}
    if options.source:
        annotations[f"{ANNOTATION_PREFIX}source"] = options.source
    for index, rule in enumerate(rules):
        annotations[f"{ANNOTATION_PREFIX}egress-{index}"] = rule.summary
    policy = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": selection.namespace, "annotations": annotations},
        "spec": {"endpointSelector": {"matchLabels": selector}, "egress": egress},
    }
    header = [
        f"Suggested by `flowtel policy suggest` ({selection.describe()}) from {observed}.",
        "It allows exactly the egress observed in that window; review it before applying.",
    ]
    header.extend(f"warning: {w}" for w in warnings)
    return Suggestion(policy, comments, header, warnings, obs.flows_read, obs.flows_used)
