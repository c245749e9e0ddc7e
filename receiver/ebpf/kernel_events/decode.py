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

from flowtel.histogram import TCP_HANDSHAKE_RTT_BOUNDS, Histogram
from flowtel.records import TCP_RST, EventKind, Flow, MetricKind, MetricPoint, Verdict, frozen_extensions
from receiver.ebpf.layout import struct_for
from receiver.ebpf.retina_reasons import UNKNOWN_DIRECTION, retina_drop

# struct kernel_event kinds and flags (bpf/flowtel.h).
KIND_DROP = 1
KIND_TCP_ESTABLISHED = 2
KIND_TCP_CLOSED = 3
KIND_TCP_RETRANSMIT = 4
KIND_TCP_RESET_SENT = 5
KIND_TCP_RESET_RECV = 6
FLAG_LIFETIME = 0x01
DROP_DIRECTIONS = ("ingress", "egress")  # FLOWTEL_DROP_INGRESS, FLOWTEL_DROP_EGRESS

# The record kind of each kernel event kind (its name is ``extensions.tcp_event`` on the wire).
TCP_EVENTS = {
    KIND_TCP_ESTABLISHED: EventKind.TCP_ESTABLISHED,
    KIND_TCP_CLOSED: EventKind.TCP_CLOSED,
    KIND_TCP_RETRANSMIT: EventKind.TCP_RETRANSMIT,
    KIND_TCP_RESET_SENT: EventKind.TCP_RESET_SENT,
    KIND_TCP_RESET_RECV: EventKind.TCP_RESET_RECEIVED,
}

METRIC_HANDSHAKE_RTT = "flowtel_tcp_handshake_rtt_seconds"

# Indexes of kev_counters (FLOWTEL_KEV_CNT_* in bpf/flowtel.h).
CNT_RINGBUF_FULL = 0
CNT_DROP_MAP_FULL = 1
CNT_CONN_TABLE_FULL = 2
CNT_RETRANS_SEGS = 3
CNT_RESETS_SENT = 4
CNT_RESETS_RECEIVED = 5
CNT_RTT_SUM_NS = 6
CNT_RTT_COUNT = 7
CNT_MAX = 8

# LostEvents sources, by the counter that measures them.
LOST_SOURCES = {
    CNT_RINGBUF_FULL: "KERNEL_EVENTS_RING_BUFFER",
    CNT_DROP_MAP_FULL: "DROP_STATS_MAP_FULL",
    CNT_CONN_TABLE_FULL: "TCP_CONNECTION_TABLE_FULL",
}

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


class EventDecoder:
    """Turns ``struct kernel_event`` bytes into flow records.

    ``ifname(index)`` names an interface of the agent's own network namespace and
    ``symbol(address)`` names a kernel code address; both are supplied by the caller.
    """

    def __init__(
        self,
        event_ctype: type[ctypes.Structure],
        names: Names,
        node_name: str,
        *,
        host_netns: int,
        ifname: Callable[[int], str],
        symbol: Callable[[int], str],
    ) -> None:
        self._struct, fields = struct_for(event_ctype)
        self.size = self._struct.size
        self._names = names
        self._node = node_name
        self._host_netns = host_netns
        self._ifname = ifname
        self._symbol = symbol
        idx = {n: i for i, n in enumerate(fields)}
        want = ("time_ns", "value_ns", "location", "saddr", "daddr", "reason", "len", "netns", "ifindex",
                "error", "sport", "dport", "ethertype", "kind", "family", "protocol", "direction", "state",
                "tcp_flags", "flags")
        missing = [n for n in want if n not in idx]
        if missing:
            raise RuntimeError(f"struct kernel_event in bpf/flowtel.h lacks {missing}")
        self._idx = tuple(idx[n] for n in want)
        # Client-side handshake RTTs of the ESTABLISHED events decoded (the kernel counts only
        # their sum and count; the buckets come from the events).
        self.rtt = Histogram(TCP_HANDSHAKE_RTT_BOUNDS)

    def decode(self, data: bytes, wall_offset_ns: int) -> list[Flow]:
        """Records of the events in ``data`` (whole events back to back)."""
        out: list[Flow] = []
        for t in self._struct.iter_unpack(data):
            (time_ns, value_ns, location, saddr, daddr, reason, length, netns, ifindex, error, sport, dport,
             ethertype, kind, family, protocol, direction, state, tcp_flags, flags) = (t[i] for i in self._idx)
            version, src = _address(family, saddr)
            _, dst = _address(family, daddr)
            when = time_ns + wall_offset_ns
            if kind == KIND_DROP:
                out.append(self._drop(when, version, src, dst, protocol, sport, dport, ethertype, reason, length,
                                      netns, ifindex, direction, tcp_flags, location))
            elif kind in TCP_EVENTS:
                out.append(self._tcp(when, kind, version, src, dst, sport, dport, state, value_ns, length,
                                     error, reason, flags))
        return out

    def _drop(self, when: int, version: int, src: str, dst: str, protocol: int, sport: int, dport: int,
              ethertype: int, reason: int, length: int, netns: int, ifindex: int, direction: int,
              tcp_flags: int, location: int) -> Flow:
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
        return Flow(
            time_ns=when,
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
            packets=1,
            bytes=length,
            tcp_flags=tcp_flags,
            kind=EventKind.DROP,
            drop_reason=self._names.drop_reason(reason),
            extensions=frozen_extensions(ext),
        )

    def _tcp(self, when: int, kind: int, version: int, src: str, dst: str, sport: int, dport: int, state: int,
             value_ns: int, length: int, error: int, reason: int, flags: int) -> Flow:
        ext: dict[str, object] = {}
        if state:
            ext["tcp_state"] = self._names.tcp_state(state)
        if kind == KIND_TCP_ESTABLISHED and value_ns:
            ext["handshake_rtt_ns"] = value_ns
            self.rtt.observe(value_ns / 1e9)
        elif kind == KIND_TCP_CLOSED and flags & FLAG_LIFETIME:
            ext["lifetime_ns"] = value_ns
        elif kind == KIND_TCP_RETRANSMIT:
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


def connection(names: Names, conn: ctypes.Structure) -> TcpConnection:
    """A :class:`TcpConnection` from one ``struct tcp_conn`` (bcc's ctypes value)."""
    version, src = _address(conn.family, bytes(conn.saddr))
    _, dst = _address(conn.family, bytes(conn.daddr))
    return TcpConnection(
        ip_version=version,
        src_ip=src,
        src_port=conn.sport,
        dst_ip=dst,
        dst_port=conn.dport,
        state=names.tcp_state(conn.state),
        start_ns=conn.start_ns,
        born_seen=bool(conn.born_seen),
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
    for (reason, direction), (packets, nbytes) in sorted(merged.items()):
        attrs = {"reason": reason, "direction": direction}
        out.append(MetricPoint("networkobservability_drop_count", packets, MetricKind.SUM, now_ns, attrs,
                               description="Packets dropped by the kernel, by drop reason and direction"))
        out.append(MetricPoint("networkobservability_drop_bytes", nbytes, MetricKind.SUM, now_ns, dict(attrs), "By",
                               "Bytes (skb length at the drop) dropped by the kernel, by reason and direction"))
    return out


def tcp_points(states: dict[int, int], counters: Counters, names: Names, now_ns: int,
               rtt: Histogram | None = None) -> list[MetricPoint]:
    """Node-level TCP metrics: sockets by state, retransmitted segments, resets, and the
    handshake RTT histogram when ``rtt`` (the decoder's, fed by ESTABLISHED events) is given."""
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
    if rtt is not None:
        out.append(rtt.point(METRIC_HANDSHAKE_RTT, now_ns, unit="s",
                             description="Client-side TCP handshake RTTs (SYN_SENT to ESTABLISHED)"))
    return out


def lost_deltas(counters: Counters, seen: dict[int, int]) -> Iterable[tuple[str, int]]:
    """(source, newly lost) for each loss counter that grew since ``seen`` (updated in place)."""
    for index, source in LOST_SOURCES.items():
        value = counters[index]
        delta = value - seen.get(index, 0)
        seen[index] = value
        if delta > 0:
            yield source, delta
