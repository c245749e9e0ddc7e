"""The service dependency graph: who talks to whom, over what, and how it went.

One model feeds three outputs: the ``servicegraph`` connector (``flowtel_service_graph_*``
metrics), the flows extension's ``GET /map`` and the web UI. An edge is keyed by client,
server, their namespaces, protocol, server port and verdict; it carries flow records, bytes,
dropped packets, DNS latency and TCP handshake RTT.

How the ends are named: a pod's first workload (``granularity: workload``, the default) or
its pod name, then the flow's DNS names (the outside world by name), then the address.

How the client is found: ``is_reply`` when the record says; the L7 type for DNS; for TCP, a
SYN without ACK counted in the flow (its sender is the client) or a SYN-ACK (its sender is
the server); ICMP echo request/reply; otherwise the lower port is the server's, because
clients send from ephemeral ports.

Counting once: a packet between two pods of one node crosses both host-side veths, so the
receiver reports it twice, as EGRESS from the sender's veth and INGRESS at the receiver's.
Within one batch (one drain of the kernel maps) an INGRESS record whose 5-tuple was also
seen as EGRESS is left out, so bytes match what the two ends sent. DNS responses are the
exception: the copy the client received is kept, with the latency the client saw.
"""
from __future__ import annotations

import operator
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence, TypeGuard

from flowtel.lib.hubble.timefmt import format_time
from flowtel.recordtables import PROTOCOL_NAMES
from flowtel.records import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    Endpoint,
    EventKind,
    Flow,
    Record,
    TrafficDirection,
    Verdict,
    flow_fields,
)

Granularity = Literal["workload", "pod"]

_PORTED = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP)
_ICMP_ECHO_REQUEST = {IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 128}
_ICMP_ECHO_REPLY = {IPPROTO_ICMP: 0, IPPROTO_ICMPV6: 129}


@dataclass(frozen=True, slots=True)
class Node:
    """One end of an edge. ``kind`` is ``workload``, ``pod``, ``dns`` or ``ip``."""

    name: str
    namespace: str
    kind: str

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True)
class EdgeKey:
    client: Node
    server: Node
    protocol: str  # TCP, UDP, SCTP, ICMPv4, ICMPv6, DNS, or IPv4/IPv6 for other protocols
    port: str  # the server's port; "" where the protocol has none
    verdict: str
    # The labels once built: every flush emits every edge's points with them.
    labels_memo: dict[str, str] | None = field(default=None, init=False, compare=False, repr=False, hash=False)

    def labels(self) -> dict[str, str]:
        """The metric labels (documented in connectors/servicegraph/README.md); shared by
        every point of the edge, read-only."""
        memo = self.labels_memo
        if memo is not None:
            return memo
        memo = {
            "client": self.client.name,
            "server": self.server.name,
            "client_namespace": self.client.namespace,
            "server_namespace": self.server.namespace,
            "protocol": self.protocol,
            "port": self.port,
            "verdict": self.verdict,
        }
        object.__setattr__(self, "labels_memo", memo)  # a memo of the frozen fields, not a change
        return memo


@dataclass(slots=True)
class EdgeStats:
    flows: int = 0
    bytes: int = 0
    packets: int = 0
    dropped: int = 0  # packets (or records, where a drop carries no count) with verdict DROPPED
    dns_latency_ns_sum: int = 0
    dns_latency_count: int = 0
    handshake_rtt_ns_sum: int = 0
    handshake_rtt_count: int = 0
    first_seen_ns: int = 0
    last_seen_ns: int = 0
    # When this agent last counted into the edge (monotonic seconds): expiry goes by the
    # agent's clock, not by flow times, which come from other clocks and files.
    touched: float = 0.0


# Every field of an EdgeStats, in order, read in one C call (a snapshot copies each edge).
_stats_values = operator.attrgetter(*EdgeStats.__slots__)


def node_of(ep: Endpoint | None, ip: str, names: Sequence[str], granularity: Granularity = "workload") -> Node:
    if ep is not None and ep.pod_name:
        if granularity == "workload" and ep.workloads and ep.workloads[0].name:
            return Node(ep.workloads[0].name, ep.namespace, "workload")
        return Node(ep.pod_name, ep.namespace, "pod")
    if names:
        return Node(names[0].lower().removesuffix("."), "", "dns")
    return Node(ip, "", "ip")


def source_is_client(flow: Flow) -> bool:
    """Whether the flow's source is the client of the exchange (see the module docstring)."""
    if flow.is_reply is not None:
        return not flow.is_reply
    if flow.kind is EventKind.DNS_REQUEST or flow.kind is EventKind.DNS_UNANSWERED:
        return True
    if flow.kind is EventKind.DNS_RESPONSE:
        return False
    proto = flow.protocol
    if proto == IPPROTO_TCP:
        counts = flow.tcp_flag_counts
        if counts is not None and (counts.syn or counts.syn_ack):
            return bool(counts.syn)
        if counts is None and flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
            return True
    if proto in _ICMP_ECHO_REQUEST:
        if flow.src_port == _ICMP_ECHO_REQUEST[proto]:
            return True
        if flow.src_port == _ICMP_ECHO_REPLY[proto]:
            return False
        return True
    if proto in _PORTED and flow.src_port != flow.dst_port:
        return flow.dst_port < flow.src_port
    return True


class NodeCache:
    """:func:`node_of` once per endpoint object: enrichment shares one :class:`Endpoint`
    among every record of a pod, so a graph sees few distinct ones. Keyed by identity (an
    endpoint's own hash walks all its fields); each entry holds the endpoint, so its id
    stays its own while cached. Bounded: cleared when full, refilled by the next flows."""

    def __init__(self, max_size: int = 65536) -> None:
        self.max_size = max_size
        self._by_id: dict[tuple[int, str], tuple[Endpoint, Node]] = {}

    def __call__(self, ep: Endpoint | None, ip: str, names: Sequence[str],
                 granularity: Granularity = "workload") -> Node:
        if ep is not None:  # the common case first: a pod's endpoint already seen
            hit = self._by_id.get((id(ep), granularity))
            if hit is not None and hit[0] is ep:
                return hit[1]
        if ep is None or not ep.pod_name:
            return node_of(ep, ip, names, granularity)  # named by address or DNS name: per flow
        key = (id(ep), granularity)
        hit = self._by_id.get(key)
        if hit is not None and hit[0] is ep:
            return hit[1]
        node = node_of(ep, ip, names, granularity)
        if len(self._by_id) >= self.max_size:
            self._by_id.clear()
        self._by_id[key] = (ep, node)
        return node


def edge_of(flow: Flow, granularity: Granularity = "workload",
            node: Callable[[Endpoint | None, str, Sequence[str], Granularity], Node] = node_of) -> EdgeKey:
    return EdgeKey(*_edge_parts(flow, granularity, node))


def _edge_parts(flow: Flow, granularity: Granularity,
                node: Callable[[Endpoint | None, str, Sequence[str], Granularity], Node]) -> tuple[Node, Node, str, str, str]:
    source, src_ip, source_names, destination, dst_ip, destination_names, l7, proto, ip_version, sport, dport, \
        verdict = _edge_fields(flow)
    src = node(source, src_ip, source_names, granularity)
    dst = node(destination, dst_ip, destination_names, granularity)
    client_is_src = source_is_client(flow)
    client, server = (src, dst) if client_is_src else (dst, src)
    if l7 is not None:
        protocol = "DNS"
    else:
        protocol = PROTOCOL_NAMES.get(proto, "IPv6" if ip_version == 6 else "IPv4")
    port = ""
    if proto in _PORTED:
        port = str(dport if client_is_src else sport)
    return client, server, protocol, port, str(verdict)


_edge_fields = flow_fields("source", "src_ip", "source_names", "destination", "dst_ip", "destination_names", "l7",
                           "protocol", "ip_version", "src_port", "dst_port", "verdict")


# A packet's identity within a batch, read in one C call (a named tuple's attributes are a
# descriptor call each).
_tuple: Callable[[Flow], tuple[Any, ...]] = flow_fields(
    "src_ip", "dst_ip", "protocol", "src_port", "dst_port", "kind", "verdict")


def _preferred(flow: Flow) -> TrafficDirection:
    # A DNS response is kept where the client received it: its latency there is what the
    # client waited, where the server's side would show only the server's own time.
    if flow.kind is EventKind.DNS_RESPONSE:
        return TrafficDirection.INGRESS
    return TrafficDirection.EGRESS


def countable(batch: Iterable[Record]) -> list[Flow]:
    """The IP flows of a batch, each packet once (see "Counting once" above). Drop samples are
    left out: the drop records of the same interval count those drops already."""
    sample = EventKind.DROP_SAMPLE
    flows = [r for r in batch if isinstance(r, Flow) and r.ip_version != 0 and r.kind is not sample]
    # _preferred inline: EGRESS, INGRESS for a DNS response.
    egress, ingress, unknown, response = (TrafficDirection.EGRESS, TrafficDirection.INGRESS,
                                          TrafficDirection.UNKNOWN, EventKind.DNS_RESPONSE)
    kept = set()
    others = False
    for f in flows:
        direction = f.traffic_direction
        if direction == (ingress if f.kind is response else egress):
            kept.add(_tuple(f))
        elif direction != unknown:
            others = True
    if not kept or not others:
        return flows
    out = []
    for f in flows:
        direction = f.traffic_direction
        twin = (direction != unknown and direction != (ingress if f.kind is response else egress)
                and _tuple(f) in kept)
        if not twin:
            out.append(f)
    return out


class ServiceGraph:
    """Edges accumulated since start (cumulative, as the metrics are), thread-safe.

    Edges idle for ``expire_after`` seconds are forgotten; at most ``max_edges`` are kept
    and flows for further edges are counted in ``overflow`` rather than growing memory.
    """

    def __init__(self, *, granularity: Granularity = "workload", expire_after: float = 600.0,
                 max_edges: int = 10_000) -> None:
        self.granularity: Granularity = granularity
        self.expire_after = expire_after
        self.max_edges = max_edges
        self.overflow = 0
        # By the edge's fields as a tuple of strings (hashed in C; an EdgeKey's generated
        # hash runs Python for it and both nodes): the key and its stats.
        self._edges: dict[tuple[str, ...], tuple[EdgeKey, EdgeStats]] = {}
        self._nodes = NodeCache()
        self._lock = threading.Lock()

    def add(self, batch: Iterable[Record]) -> None:
        """Count a batch in: its flows grouped by edge first, then each edge updated once with
        its group's sums (what :func:`_count` per record gives: tested equal), so the lock, the
        stats' attribute writes and their clock are paid per distinct edge, not per record."""
        flows = countable(batch)
        if not flows:
            return
        granularity = self.granularity
        nodes = self._nodes
        groups: dict[tuple[str, ...], tuple[tuple[Node, Node, str, str, str], list[Flow]]] = {}
        for flow in flows:
            client, server, protocol, port, verdict = parts = _edge_parts(flow, granularity, nodes)
            key = (client.name, client.namespace, client.kind, server.name, server.namespace, server.kind,
                   protocol, port, verdict)
            group = groups.get(key)
            if group is None:
                groups[key] = (parts, [flow])
            else:
                group[1].append(flow)
        now = time.monotonic()
        with self._lock:
            edges = self._edges
            for edge, (parts, members) in groups.items():
                entry = edges.get(edge)
                if entry is None:
                    if len(edges) >= self.max_edges:
                        self.overflow += len(members)
                        continue
                    entry = edges[edge] = (EdgeKey(*parts), EdgeStats(first_seen_ns=members[0].time_ns))
                stats = entry[1]
                _count_group(stats, members)
                stats.touched = now

    def expire(self, now: float | None = None) -> int:
        """Forget edges not counted into for ``expire_after`` seconds (``now``: monotonic)."""
        if self.expire_after <= 0:
            return 0
        cutoff = (time.monotonic() if now is None else now) - self.expire_after
        with self._lock:
            stale = [k for k, (_, s) in self._edges.items() if s.touched < cutoff]
            for k in stale:
                del self._edges[k]
        return len(stale)

    def snapshot(self) -> list[tuple[EdgeKey, EdgeStats]]:
        with self._lock:
            return [(k, EdgeStats(*_stats_values(s))) for k, s in self._edges.values()]

    def __len__(self) -> int:
        return len(self._edges)


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _count(stats: EdgeStats, flow: Flow) -> None:
    stats.flows += 1
    if flow.is_packets:
        stats.bytes += flow.bytes
        stats.packets += flow.packets
    if flow.verdict == Verdict.DROPPED:
        stats.dropped += flow.packets or 1
    if flow.l7 is not None and flow.kind is EventKind.DNS_RESPONSE and flow.latency_ns > 0:
        stats.dns_latency_ns_sum += flow.latency_ns
        stats.dns_latency_count += 1
    ext = flow.extensions
    # Connection records are aggregated in the kernel: an RTT sum and how many it adds up.
    rtt_sum, rtt_count = ext.get("handshake_rtt_ns_sum"), ext.get("handshake_rtt_count")
    if rtt_sum is None:
        rtt_sum, rtt_count = ext.get("handshake_rtt_ns"), 1
    if _positive_int(rtt_sum) and _positive_int(rtt_count):
        stats.handshake_rtt_ns_sum += rtt_sum
        stats.handshake_rtt_count += rtt_count
    if flow.time_ns > stats.last_seen_ns:
        stats.last_seen_ns = flow.time_ns
    if flow.time_ns < stats.first_seen_ns:
        stats.first_seen_ns = flow.time_ns


_group_fields = flow_fields("kind", "verdict", "packets", "bytes", "l7", "latency_ns", "extensions", "time_ns")
_PACKET, _DROP, _DNS_RESPONSE = EventKind.PACKET, EventKind.DROP, EventKind.DNS_RESPONSE


def _count_group(stats: EdgeStats, group: list[Flow]) -> None:
    """:func:`_count` of every flow of ``group`` (one edge's flows of a batch), summed locally
    and written once: the same values (``test_a_batch_counts_as_its_records_one_by_one``)."""
    nbytes = packets = dropped = dns_sum = dns_count = rtt_total = rtt_n = 0
    first, last = stats.first_seen_ns, stats.last_seen_ns
    dropped_verdict = Verdict.DROPPED
    for kind, verdict, n_packets, n_bytes, l7, latency_ns, ext, time_ns in map(_group_fields, group):
        if kind is _PACKET or kind is _DROP:
            nbytes += n_bytes
            packets += n_packets
        if verdict == dropped_verdict:
            dropped += n_packets or 1
        if l7 is not None and kind is _DNS_RESPONSE and latency_ns > 0:
            dns_sum += latency_ns
            dns_count += 1
        if ext:  # most flows carry none: the RTT keys are looked up only where there are some
            rtt_sum, rtt_count = ext.get("handshake_rtt_ns_sum"), ext.get("handshake_rtt_count")
            if rtt_sum is None:
                rtt_sum, rtt_count = ext.get("handshake_rtt_ns"), 1
            if _positive_int(rtt_sum) and _positive_int(rtt_count):
                rtt_total += rtt_sum
                rtt_n += rtt_count
        if time_ns > last:
            last = time_ns
        if time_ns < first:
            first = time_ns
    stats.flows += len(group)
    stats.bytes += nbytes
    stats.packets += packets
    stats.dropped += dropped
    stats.dns_latency_ns_sum += dns_sum
    stats.dns_latency_count += dns_count
    stats.handshake_rtt_ns_sum += rtt_total
    stats.handshake_rtt_count += rtt_n
    stats.last_seen_ns = last
    stats.first_seen_ns = first


def _in_namespace(key: EdgeKey, namespaces: Sequence[str]) -> bool:
    return key.client.namespace in namespaces or key.server.namespace in namespaces


def graph_to_dict(edges: Sequence[tuple[EdgeKey, EdgeStats]], *, namespaces: Sequence[str] = (),
                  overflow: int = 0) -> dict[str, Any]:
    """The JSON served at ``GET /map`` (shape in extensions/flows/README.md).

    With ``namespaces``, only edges with an end in one of them (and their nodes).
    """
    all_namespaces = sorted({n.namespace for k, _ in edges for n in (k.client, k.server) if n.namespace})
    if namespaces:
        edges = [(k, s) for k, s in edges if _in_namespace(k, namespaces)]
    nodes: dict[str, Node] = {}
    out_edges = []
    for key, s in sorted(edges, key=lambda e: (e[0].client.id, e[0].server.id, e[0].protocol, e[0].port, e[0].verdict)):
        nodes.setdefault(key.client.id, key.client)
        nodes.setdefault(key.server.id, key.server)
        out_edges.append({
            "client": key.client.id,
            "server": key.server.id,
            "client_namespace": key.client.namespace,
            "server_namespace": key.server.namespace,
            "protocol": key.protocol,
            "port": key.port,
            "verdict": key.verdict,
            "flows": s.flows,
            "bytes": s.bytes,
            "packets": s.packets,
            "dropped": s.dropped,
            "dns_latency_seconds": {"sum": s.dns_latency_ns_sum / 1e9, "count": s.dns_latency_count},
            "tcp_handshake_rtt_seconds": {"sum": s.handshake_rtt_ns_sum / 1e9, "count": s.handshake_rtt_count},
            "first_seen": format_time(s.first_seen_ns),
            "last_seen": format_time(s.last_seen_ns),
        })
    return {
        "nodes": [{"id": n.id, "name": n.name, "namespace": n.namespace, "kind": n.kind}
                  for _, n in sorted(nodes.items())],
        "edges": out_edges,
        "namespaces": all_namespaces,
        "edges_overflow": overflow,
    }
