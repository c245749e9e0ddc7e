"""Kernel events and counters into records: flows, lost events, metric points (pure logic).

Names of drop reasons, TCP states and reset reasons come from the running kernel's tracefs
formats (see program.py); this module only applies them.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterable

from flowtel.histogram import TCP_HANDSHAKE_RTT_BOUNDS
from flowtel.lib.bpf.constants import HEADER
from flowtel.lib.bpf.layout import struct_for
from flowtel.records import TCP_RST, EventKind, Flow, MetricKind, MetricPoint, Verdict, frozen_extensions
from receiver.ebpf.retina_reasons import UNKNOWN_DIRECTION, retina_drop

# struct kernel_event kinds and flags, counter indexes: from bpf/flowtel.h itself.
KIND_DROP = HEADER.KEV_DROP
KIND_TCP_ESTABLISHED = HEADER.KEV_TCP_ESTABLISHED
KIND_TCP_CLOSED = HEADER.KEV_TCP_CLOSED
KIND_TCP_RETRANSMIT = HEADER.KEV_TCP_RETRANSMIT
KIND_TCP_RESET_SENT = HEADER.KEV_TCP_RESET_SENT
KIND_TCP_RESET_RECV = HEADER.KEV_TCP_RESET_RECV
FLAG_TCP_SEQ = HEADER.KEV_F_TCP_SEQ
# Indexed by FLOWTEL_DROP_INGRESS / FLOWTEL_DROP_EGRESS.
DROP_DIRECTIONS = tuple(name.lower() for name, _ in sorted(
    ((n, v) for n, v in HEADER.with_prefix("DROP_").items() if n in ("INGRESS", "EGRESS")), key=lambda nv: nv[1]))

# The record kind of each kernel event kind (its name is ``extensions.tcp_event`` on the wire).
TCP_EVENTS = {
    KIND_TCP_ESTABLISHED: EventKind.TCP_ESTABLISHED,
    KIND_TCP_CLOSED: EventKind.TCP_CLOSED,
    KIND_TCP_RETRANSMIT: EventKind.TCP_RETRANSMIT,
    KIND_TCP_RESET_SENT: EventKind.TCP_RESET_SENT,
    KIND_TCP_RESET_RECV: EventKind.TCP_RESET_RECEIVED,
}

# The kinds the ring buffer carries one by one.
RING_TCP_EVENTS = frozenset({KIND_TCP_RETRANSMIT, KIND_TCP_RESET_SENT, KIND_TCP_RESET_RECV})

METRIC_HANDSHAKE_RTT = "flowtel_tcp_handshake_rtt_seconds"
METRIC_DROP_SAMPLES = "flowtel_drop_samples_total"
METRIC_DROP_SAMPLES_SUPPRESSED = "flowtel_drop_samples_suppressed_total"

CNT_RINGBUF_FULL = HEADER.KEV_CNT_RINGBUF_FULL
CNT_DROP_MAP_FULL = HEADER.KEV_CNT_DROP_MAP_FULL
CNT_CONN_TABLE_FULL = HEADER.KEV_CNT_CONN_TABLE_FULL
CNT_RETRANS_SEGS = HEADER.KEV_CNT_RETRANS_SEGS
CNT_RESETS_SENT = HEADER.KEV_CNT_RESETS_SENT
CNT_RESETS_RECEIVED = HEADER.KEV_CNT_RESETS_RECEIVED
CNT_RTT_SUM_NS = HEADER.KEV_CNT_RTT_SUM_NS
CNT_RTT_COUNT = HEADER.KEV_CNT_RTT_COUNT
CNT_DROP_FLOWS_CREATED = (HEADER.KEV_CNT_DROP_FLOWS_CREATED_0, HEADER.KEV_CNT_DROP_FLOWS_CREATED_1)
CNT_DROP_FLOW_UPDATE_FAIL = HEADER.KEV_CNT_DROP_FLOW_UPDATE_FAIL
CNT_RTT_HIST = HEADER.KEV_CNT_RTT_HIST
CNT_DROP_SAMPLES = HEADER.KEV_CNT_DROP_SAMPLES
CNT_DROP_SAMPLES_SUPPRESSED = HEADER.KEV_CNT_DROP_SAMPLES_SUPPRESSED
CNT_CONN_FLOWS_CREATED = (HEADER.KEV_CNT_CONN_FLOWS_CREATED_0, HEADER.KEV_CNT_CONN_FLOWS_CREATED_1)
CNT_CONN_FLOW_UPDATE_FAIL = HEADER.KEV_CNT_CONN_FLOW_UPDATE_FAIL
# CLOSEs that never reached the program, counted late (not lost) when the socket's address
# became a new socket's (bpf/kernel_events.c, flowtel_state): self-telemetry.
CNT_CONN_CLOSE_UNSEEN = HEADER.KEV_CNT_CONN_CLOSE_UNSEEN
CNT_MAX = HEADER.KEV_CNT_MAX
ROLE_CLIENT = HEADER.TCP_ROLE_CLIENT
CONN_BORN_SEEN = HEADER.CONN_BORN_SEEN  # struct tcp_conn_set.info
ROLE_SERVER = HEADER.TCP_ROLE_SERVER
# extensions.tcp_role of a connection record, by FLOWTEL_TCP_ROLE_* (unknown: no entry).
ROLE_NAMES = {ROLE_CLIENT: "client", ROLE_SERVER: "server"}

# LostEvents sources, by the counter that measures them.
LOST_SOURCES = {
    CNT_RINGBUF_FULL: "KERNEL_EVENTS_RING_BUFFER",
    CNT_DROP_MAP_FULL: "DROP_STATS_MAP_FULL",
    CNT_CONN_TABLE_FULL: "TCP_CONNECTION_TABLE_FULL",
    CNT_DROP_FLOW_UPDATE_FAIL: "DROP_FLOW_UPDATE_FAILED",
    CNT_CONN_FLOW_UPDATE_FAIL: "TCP_CONNECTION_FLOW_UPDATE_FAILED",
}
# Drop flows the LRU evicted before a drain (counted by the double buffer, not a counter).
LOST_DROP_FLOW_MAP_FULL = "DROP_FLOW_MAP_FULL"
# Tracepoint runs the kernel skipped because another tracing program ran on the CPU (its
# bpf_prog_active): read from the programs' recursion_misses, not from a counter of ours.
LOST_PROGRAM_MISSED = "KERNEL_EVENTS_PROGRAM_SKIPPED"
# Connection flows likewise (tcp.max_connection_flows distinct keys in one interval exceeded).
LOST_CONN_FLOW_MAP_FULL = "TCP_CONNECTION_FLOW_MAP_FULL"

_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_NOT_TRACKED_STATES = {"CLOSE", "NEW_SYN_RECV"}  # never held by a tracked socket


@dataclass(frozen=True, slots=True)
class Names:
    """The running kernel's names for the enums in events (from tracefs)."""

    drop_reasons: dict[int, str] = field(default_factory=dict)
    tcp_states: dict[int, str] = field(default_factory=dict)
    reset_reasons: dict[int, str] = field(default_factory=dict)

    def drop_reason(self, value: int) -> str:
        name = self.drop_reasons.get(value)
        if name is not None:
            return name
        # Subsystem reasons (mac80211, openvswitch, …) carry the subsystem in the high bits.
        if value >> 16:
            return f"SUBSYS_{value >> 16}_{value & 0xFFFF}"
        return f"UNKNOWN_{value}"

    def tcp_state(self, value: int) -> str:
        return self.tcp_states.get(value, f"UNKNOWN_{value}")


@functools.lru_cache(maxsize=65536)
def _address(family: int, raw: bytes) -> tuple[int, str]:
    """IP version and text; IPv4-mapped IPv6 (dual-stack sockets) is shown as the IPv4 it is."""
    if family == 4:
        return 4, socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == 6:
        if raw[:12] == _V4_MAPPED:
            return 4, socket.inet_ntop(socket.AF_INET, raw[12:16])
        return 6, socket.inet_ntop(socket.AF_INET6, raw)
    return 0, ""


@dataclass(frozen=True, slots=True)
class TcpConnection:
    """A socket in the kernel's tracking table (``tcp_conns``), for inspection."""

    ip_version: int
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    state: str
    start_ns: int  # CLOCK_MONOTONIC
    born_seen: bool


@dataclass(frozen=True, slots=True)
class Counters:
    """Sums over CPUs of the kernel's cumulative counters."""

    values: tuple[int, ...]

    def __getitem__(self, index: int) -> int:
        return self.values[index]


@dataclass(slots=True)
class RawDrop:
    """One drained entry of the drop flow maps: struct drop_flow_key then drop_flow_stats."""

    saddr: bytes
    daddr: bytes
    location: int
    reason: int
    netns: int
    ifindex: int
    sport: int
    dport: int
    ethertype: int
    family: int
    protocol: int
    direction: int
    packets: int
    bytes: int
    first_ns: int
    last_ns: int
    tcp_flags: int


class DropDecoder:
    """Drained drop flow entries into drop flow records (verdict DROPPED, counts in ``packets``
    and ``bytes``). ``ifname(index)`` names an interface of the agent's own network namespace
    and ``symbol(address)`` a kernel code address; both are supplied by the caller."""

    def __init__(self, names: Names, node_name: str, *, host_netns: int, ifname: Callable[[int], str],
                 symbol: Callable[[int], str]) -> None:
        self._names = names
        self._node = node_name
        self._host_netns = host_netns
        self._ifname = ifname
        self._symbol = symbol

    def decode(self, drops: Iterable[RawDrop], wall_offset_ns: int) -> list[Flow]:
        return [self.flow(d.family, d.saddr, d.daddr, d.sport, d.dport, d.protocol, d.ethertype, d.netns,
                          d.ifindex, d.direction, d.reason, d.location, d.packets, d.bytes, d.tcp_flags,
                          d.last_ns + wall_offset_ns)
                for d in drops]

    def flow(self, family: int, saddr: bytes, daddr: bytes, sport: int, dport: int, protocol: int,
             ethertype: int, netns: int, ifindex: int, direction: int, reason: int, location: int,
             packets: int, nbytes: int, tcp_flags: int, time_ns: int, *, sample: bool = False,
             tcp_seq: int | None = None) -> Flow:
        """One drop flow record, or (``sample``) the record of one drop sent on its own: kind
        ``DROP_SAMPLE``, one packet, its exact time, ``skb_len`` and TCP sequence number in
        ``extensions``; a drop flow record counts that drop as well."""
        version, src = _address(family, saddr)
        _, dst = _address(family, daddr)
        ext: dict[str, object] = {"drop_direction": DROP_DIRECTIONS[direction & 1]}
        symbol = self._symbol(location) if location else ""
        if symbol:
            ext["drop_location"] = symbol
        if netns:
            ext["netns_inode"] = netns
        # An ifindex means something only within its namespace: the flow's interface fields
        # are the node's, so one of a pod's namespace goes to extensions instead.
        host = netns == self._host_netns
        if ifindex and not host:
            ext["netns_ifindex"] = ifindex
        if sample:
            ext["skb_len"] = nbytes
            if tcp_seq is not None:
                ext["tcp_seq"] = tcp_seq
        return Flow(
            time_ns=time_ns,
            node_name=self._node,
            verdict=Verdict.DROPPED,
            ip_version=version,
            src_ip=src,
            dst_ip=dst,
            protocol=protocol if version else 0,
            src_port=sport,
            dst_port=dport,
            ethertype=ethertype or (0x86DD if version == 6 else 0x0800),
            ifindex=ifindex if host else 0,
            ifname=self._ifname(ifindex) if host and ifindex else "",
            packets=packets,
            bytes=nbytes,
            tcp_flags=tcp_flags,
            kind=EventKind.DROP_SAMPLE if sample else EventKind.DROP,
            drop_reason=self._names.drop_reason(reason),
            extensions=frozen_extensions(ext),
        )


@dataclass(slots=True)
class RawConn:
    """One drained entry of the connection flow maps: struct conn_flow_key then conn_flow_stats."""

    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    family: int
    role: int
    kind: int
    state: int
    connections: int
    rtt_sum_ns: int
    rtt_count: int
    lifetime_sum_ns: int
    lifetime_count: int
    first_ns: int
    last_ns: int
    last_value_ns: int
    last_port: int


class ConnDecoder:
    """Drained connection flow entries into ``established`` / ``closed`` records, one per key
    and interval: the local end as source, ``extensions.connections`` sockets counted, the sums
    of their handshake RTTs and whole lifetimes with how many there were. An entry of one
    connection is that connection exactly: its client port and its own RTT or lifetime."""

    def __init__(self, names: Names, node_name: str) -> None:
        self._names = names
        self._node = node_name

    def decode(self, conns: Iterable[RawConn], wall_offset_ns: int) -> list[Flow]:
        out: list[Flow] = []
        for c in conns:
            kind = TCP_EVENTS.get(c.kind)
            if kind is None or c.connections <= 0:
                continue
            version, src = _address(c.family, c.saddr)
            _, dst = _address(c.family, c.daddr)
            sport, dport = c.sport, c.dport
            one = c.connections == 1
            if one:  # the port the key left out, exact for the one connection
                if c.role == ROLE_CLIENT:
                    sport = c.last_port
                elif c.role == ROLE_SERVER:
                    dport = c.last_port
            ext: dict[str, object] = {"connections": c.connections}
            if c.state:
                ext["tcp_state"] = self._names.tcp_state(c.state)
            role = ROLE_NAMES.get(c.role)
            if role:
                ext["tcp_role"] = role
            if c.kind == KIND_TCP_ESTABLISHED and c.rtt_count:
                ext["handshake_rtt_ns_sum"] = c.rtt_sum_ns
                ext["handshake_rtt_count"] = c.rtt_count
                if one:
                    ext["handshake_rtt_ns"] = c.rtt_sum_ns
            elif c.kind == KIND_TCP_CLOSED and c.lifetime_count:
                ext["lifetime_ns_sum"] = c.lifetime_sum_ns
                ext["lifetime_count"] = c.lifetime_count
                if one:
                    ext["lifetime_ns"] = c.lifetime_sum_ns
            if not one:
                ext["first_time_ns"] = c.first_ns + wall_offset_ns
            out.append(Flow(
                time_ns=c.last_ns + wall_offset_ns,
                node_name=self._node,
                verdict=Verdict.TRACED,  # socket events, not packets
                ip_version=version,
                src_ip=src,
                dst_ip=dst,
                protocol=6,
                kind=kind,
                src_port=sport,
                dst_port=dport,
                # Which end the source is, known from the handshake: a client's record is
                # not a reply, a server's is (so no consumer guesses it from port numbers).
                is_reply=(False if c.role == ROLE_CLIENT else True if c.role == ROLE_SERVER else None),
                ethertype=0x86DD if version == 6 else 0x0800,
                extensions=frozen_extensions(ext),
            ))
        return out


class EventDecoder:
    """Turns ``struct kernel_event`` bytes (retransmit and reset events, and drop samples when
    given ``drops``, the decoder that names drops) into flow records."""

    def __init__(self, event_ctype: type[ctypes.Structure], names: Names, node_name: str,
                 drops: DropDecoder | None = None) -> None:
        self._struct, fields = struct_for(event_ctype)
        self.size = self._struct.size
        self._names = names
        self._node = node_name
        self._drops = drops
        idx = {n: i for i, n in enumerate(fields)}
        want = ("time_ns", "value_ns", "location", "saddr", "daddr", "reason", "len", "netns", "ifindex",
                "error", "sport", "dport", "ethertype", "kind", "family", "protocol", "direction", "state",
                "tcp_flags", "flags")
        missing = [n for n in want if n not in idx]
        if missing:
            raise RuntimeError(f"struct kernel_event in bpf/flowtel.h lacks {missing}")
        self._idx = tuple(idx[n] for n in want)

    def decode(self, data: bytes, wall_offset_ns: int) -> list[Flow]:
        """Records of the TCP events in ``data`` (whole events back to back)."""
        out: list[Flow] = []
        for t in self._struct.iter_unpack(data):
            (time_ns, value_ns, location, saddr, daddr, reason, length, netns, ifindex, error, sport, dport,
             ethertype, kind, family, protocol, direction, state, tcp_flags, flags) = (t[i] for i in self._idx)
            # Connections established and closed never come as events (ConnDecoder's records).
            if kind in RING_TCP_EVENTS:
                version, src = _address(family, saddr)
                _, dst = _address(family, daddr)
                out.append(self._tcp(time_ns + wall_offset_ns, kind, version, src, dst, sport, dport, state,
                                     length, error, reason))
            elif kind == KIND_DROP and self._drops is not None:
                out.append(self._drops.flow(
                    family, saddr, daddr, sport, dport, protocol, ethertype, netns, ifindex, direction, reason,
                    location, 1, length, tcp_flags, time_ns + wall_offset_ns, sample=True,
                    tcp_seq=value_ns if flags & FLAG_TCP_SEQ else None))
        return out

    def _tcp(self, when: int, kind: int, version: int, src: str, dst: str, sport: int, dport: int, state: int,
             length: int, error: int, reason: int) -> Flow:
        ext: dict[str, object] = {}
        if state:
            ext["tcp_state"] = self._names.tcp_state(state)
        if kind == KIND_TCP_RETRANSMIT:
            ext["segments"] = length
            if error:
                ext["retransmit_error"] = errno.errorcode.get(-error, str(error))
        elif kind == KIND_TCP_RESET_SENT and self._names.reset_reasons:
            ext["reset_reason"] = self._names.reset_reasons.get(reason, f"UNKNOWN_{reason}")
        resets = kind in (KIND_TCP_RESET_SENT, KIND_TCP_RESET_RECV)
        return Flow(
            time_ns=when,
            node_name=self._node,
            # A socket event, not a packet: observed, with no verdict of its own.
            verdict=Verdict.TRACED,
            ip_version=version,
            src_ip=src,
            dst_ip=dst,
            protocol=6,
            kind=TCP_EVENTS[kind],
            src_port=sport,
            dst_port=dport,
            ethertype=0x86DD if version == 6 else 0x0800,
            tcp_flags=TCP_RST if resets else 0,
            extensions=frozen_extensions(ext),
        )


def connection(names: Names, conn_set: ctypes.Structure, way: int, ends: ctypes.Structure) -> TcpConnection:
    """A :class:`TcpConnection` from way ``way`` of one ``struct tcp_conn_set`` and its
    ``struct tcp_conn_tuple`` (bcc's ctypes values)."""
    version, src = _address(ends.family, bytes(ends.saddr))
    _, dst = _address(ends.family, bytes(ends.daddr))
    return TcpConnection(
        ip_version=version,
        src_ip=src,
        src_port=ends.sport,
        dst_ip=dst,
        dst_port=ends.dport,
        state=names.tcp_state(conn_set.state[way]),
        start_ns=conn_set.start_ns[way],
        born_seen=bool(conn_set.info[way] & CONN_BORN_SEEN),
    )


def drop_points(stats: dict[tuple[int, int], tuple[int, int]], names: Names, now_ns: int) -> list[MetricPoint]:
    """``networkobservability_drop_count`` / ``_drop_bytes`` {reason, direction}, cumulative,
    with Retina's reason and direction where Retina has a name for the same event."""
    out: list[MetricPoint] = []
    # Several raw values can share a name (unknown reasons): sum them.
    merged: dict[tuple[str, str], list[int]] = {}
    for (raw_reason, raw_direction), (packets, nbytes) in stats.items():
        # As Retina files it (receiver/ebpf/retina_reasons.py); a direction value the kernel
        # side does not define is "unknown", never folded into ingress or egress.
        kernel_direction = (DROP_DIRECTIONS[raw_direction] if 0 <= raw_direction < len(DROP_DIRECTIONS)
                            else UNKNOWN_DIRECTION)
        key = retina_drop(names.drop_reason(raw_reason), kernel_direction)
        acc = merged.setdefault(key, [0, 0])
        acc[0] += packets
        acc[1] += nbytes
    for (reason_name, direction_name), (packets, nbytes) in sorted(merged.items()):
        attrs = {"reason": reason_name, "direction": direction_name}
        out.append(MetricPoint("networkobservability_drop_count", packets, MetricKind.SUM, now_ns, attrs,
                               description="Packets dropped by the kernel, by drop reason and direction"))
        out.append(MetricPoint("networkobservability_drop_bytes", nbytes, MetricKind.SUM, now_ns, dict(attrs), "By",
                               "Bytes (skb length at the drop) dropped by the kernel, by reason and direction"))
    return out


def drop_sample_points(counters: Counters, now_ns: int) -> list[MetricPoint]:
    """Drop samples sent and those the per-CPU budget held back (counted drops all the same)."""
    return [
        MetricPoint(METRIC_DROP_SAMPLES, counters[CNT_DROP_SAMPLES], MetricKind.SUM, now_ns,
                    description="Drops sent on their own as samples (drops.events_per_second); also counted in drop flows"),
        MetricPoint(METRIC_DROP_SAMPLES_SUPPRESSED, counters[CNT_DROP_SAMPLES_SUPPRESSED], MetricKind.SUM, now_ns,
                    description="Drops not sampled because the per-CPU sample budget was spent; counted in drop flows"),
    ]


def rtt_point(counters: Counters, now_ns: int) -> MetricPoint:
    """The client handshake RTT histogram, counted in the kernel (buckets, sum, count)."""
    n = len(TCP_HANDSHAKE_RTT_BOUNDS) + 1
    buckets = tuple(counters[CNT_RTT_HIST + i] for i in range(n))
    return MetricPoint(METRIC_HANDSHAKE_RTT, counters[CNT_RTT_SUM_NS] / 1e9, MetricKind.HISTOGRAM, now_ns, {},
                       "s", "Client-side TCP handshake RTTs (SYN_SENT to ESTABLISHED)",
                       bounds=TCP_HANDSHAKE_RTT_BOUNDS, bucket_counts=buckets, count=sum(buckets))


def tcp_points(states: dict[int, int], counters: Counters, names: Names, now_ns: int) -> list[MetricPoint]:
    """Node-level TCP metrics: sockets by state, retransmitted segments, resets, and the
    handshake RTT histogram."""
    out = [
        # Not networkobservability_tcp_state: that is receiver/procfs's snapshot of the node's
        # own namespace (ACNS's meaning). This one spans every namespace (pods included) but
        # knows only sockets that changed state since the agent started.
        MetricPoint("flowtel_tcp_sockets", states.get(value, 0), MetricKind.GAUGE, now_ns,
                    {"state": name}, description="TCP sockets by state in all namespaces (tracked since the agent started)")
        for value, name in sorted(names.tcp_states.items())
        if name not in _NOT_TRACKED_STATES
    ]
    out.append(MetricPoint("networkobservability_tcp_retransmission_count", counters[CNT_RETRANS_SEGS],
                           MetricKind.SUM, now_ns, description="TCP segments retransmitted (as TcpRetransSegs)"))
    for event, index in (("reset_sent", CNT_RESETS_SENT), ("reset_received", CNT_RESETS_RECEIVED)):
        out.append(MetricPoint("flowtel_tcp_reset_count", counters[index], MetricKind.SUM, now_ns,
                               {"event": event}, description="TCP resets sent and received"))
    out.append(rtt_point(counters, now_ns))
    return out


def lost_deltas(counters: Counters, seen: dict[int, int]) -> Iterable[tuple[str, int]]:
    """(source, newly lost) for each loss counter that grew since ``seen`` (updated in place)."""
    for index, source in LOST_SOURCES.items():
        value = counters[index]
        delta = value - seen.get(index, 0)
        seen[index] = value
        if delta > 0:
            yield source, delta
