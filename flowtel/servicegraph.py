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
from dataclasses import dataclass
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

    def labels(self) -> dict[str, str]:
        """The metric labels (documented in connectors/servicegraph/README.md)."""
        return {
            "client": self.client.name,
            "server": self.server.name,
            "client_namespace": self.client.namespace,
            "server_namespace": self.server.namespace,
            "protocol": self.protocol,
            "port": self.port,
            "verdict": self.verdict,
        }


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
    src = node(flow.source, flow.src_ip, flow.source_names, granularity)
    dst = node(flow.destination, flow.dst_ip, flow.destination_names, granularity)
    client_is_src = source_is_client(flow)
    client, server = (src, dst) if client_is_src else (dst, src)
    if flow.l7 is not None:
        protocol = "DNS"
    else:
        protocol = PROTOCOL_NAMES.get(flow.protocol, "IPv6" if flow.ip_version == 6 else "IPv4")
    port = ""
    if flow.protocol in _PORTED:
        port = str(flow.dst_port if client_is_src else flow.src_port)
    return client, server, protocol, port, str(flow.verdict)


def _tuple(flow: Flow) -> tuple[Any, ...]:
    return (flow.src_ip, flow.dst_ip, flow.protocol, flow.src_port, flow.dst_port,
            flow.kind, flow.verdict)


def _preferred(flow: Flow) -> TrafficDirection:
    # A DNS response is kept where the client received it: its latency there is what the
    # client waited, where the server's side would show only the server's own time.
    if flow.kind is EventKind.DNS_RESPONSE:
        return TrafficDirection.INGRESS
    return TrafficDirection.EGRESS


def countable(batch: Iterable[Record]) -> list[Flow]:
    """The IP flows of a batch, each packet once (see "Counting once" above). Drop samples are
    left out: the drop records of the same interval count those drops already."""
    flows = [r for r in batch if isinstance(r, Flow) and r.ip_version != 0 and r.kind is not EventKind.DROP_SAMPLE]
    kept = {_tuple(f) for f in flows if f.traffic_direction == _preferred(f)}
    if not kept:
        return flows
    out = []
    for f in flows:
        direction = f.traffic_direction
        twin = direction != TrafficDirection.UNKNOWN and direction != _preferred(f) and _tuple(f) in kept
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
        flows = countable(batch)
        if not flows:
            return
        granularity = self.granularity
        now = time.monotonic()
        with self._lock:
            edges = self._edges
            nodes = self._nodes
            for flow in flows:
                client, server, protocol, port, verdict = parts = _edge_parts(flow, granularity, nodes)
                key = (client.name, client.namespace, client.kind, server.name, server.namespace, server.kind,
                       protocol, port, verdict)
                entry = edges.get(key)
                if entry is None:
                    if len(edges) >= self.max_edges:
                        self.overflow += 1
                        continue
                    entry = edges[key] = (EdgeKey(*parts), EdgeStats(first_seen_ns=flow.time_ns))
                stats = entry[1]
                _count(stats, flow)
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
