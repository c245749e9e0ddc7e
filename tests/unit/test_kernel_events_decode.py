"""Kernel events into records and metric points; the kernel-events config."""
from __future__ import annotations

import ctypes
import socket
from typing import Iterator

import pytest
from pydantic import ValidationError

from flowtel.histogram import TCP_HANDSHAKE_RTT_BOUNDS, Histogram
from flowtel.records import EventKind, MetricKind, Verdict
from receiver.ebpf.kernel_events import KernelEventsConfig
from receiver.ebpf.kernel_events import decode

NAMES = decode.Names(
    drop_reasons={2: "NOT_SPECIFIED", 3: "NO_SOCKET", 12: "NETFILTER_DROP"},
    tcp_states={1: "ESTABLISHED", 2: "SYN_SENT", 7: "CLOSE", 10: "LISTEN", 12: "NEW_SYN_RECV"},
    reset_reasons={1: "NO_SOCKET", 12: "TCP_ABORT_ON_LINGER"},
)


def test_drop_reason_names() -> None:
    assert NAMES.drop_reason(12) == "NETFILTER_DROP"
    assert NAMES.drop_reason(99) == "UNKNOWN_99"
    assert NAMES.drop_reason((3 << 16) | 5) == "SUBSYS_3_5"  # e.g. mac80211's own reasons


def test_drop_points_by_reason_and_direction() -> None:
    stats = {(3, 0): (5, 500), (12, 1): (2, 200), (99, 0): (1, 10), (98, 0): (1, 20)}
    points = decode.drop_points(stats, NAMES, 7)
    by = {(p.name, p.attributes["reason"], p.attributes["direction"]): p for p in points}
    assert by[("networkobservability_drop_count", "NO_SOCKET", "ingress")].value == 5
    assert by[("networkobservability_drop_bytes", "NO_SOCKET", "ingress")].value == 500
    assert by[("networkobservability_drop_bytes", "NO_SOCKET", "ingress")].unit == "By"
    # A netfilter drop is filed as Retina files it (receiver/ebpf/retina_reasons.py).
    assert by[("networkobservability_drop_count", "IPTABLE_RULE_DROP", "unknown")].value == 2
    assert by[("networkobservability_drop_count", "UNKNOWN_99", "ingress")].value == 1
    assert all(p.kind == MetricKind.SUM and p.time_ns == 7 for p in points)
    assert len(points) == 2 * 4


def test_tcp_points() -> None:
    counters = decode.Counters((0, 0, 0, 17, 4, 2, 3_000_000, 3))
    points = decode.tcp_points({1: 6, 10: 2}, counters, NAMES, 1)
    states = {p.attributes["state"]: p.value for p in points if p.name == "flowtel_tcp_sockets"}
    # CLOSE and NEW_SYN_RECV are never held by a tracked socket: no series for them.
    assert states == {"ESTABLISHED": 6, "SYN_SENT": 0, "LISTEN": 2}
    assert all(p.kind == MetricKind.GAUGE for p in points if p.name == "flowtel_tcp_sockets")
    value = {(p.name, p.attributes.get("event")): p.value for p in points}
    assert value[("networkobservability_tcp_retransmission_count", None)] == 17
    assert value[("flowtel_tcp_reset_count", "reset_sent")] == 4
    assert value[("flowtel_tcp_reset_count", "reset_received")] == 2
    # No RTT histogram without events to make it from; the old _sum/_count pair is gone.
    assert not any(p.name.startswith("flowtel_tcp_handshake_rtt_seconds") for p in points)


def test_tcp_points_carry_the_handshake_rtt_histogram() -> None:
    counters = decode.Counters((0, 0, 0, 17, 4, 2, 3_000_000, 3))
    rtt = Histogram(TCP_HANDSHAKE_RTT_BOUNDS)
    for seconds in (0.00005, 0.0001, 0.0003, 0.02, 7.0):  # 0.0001 is a bound: its own bucket
        rtt.observe(seconds)
    points = [p for p in decode.tcp_points({1: 6}, counters, NAMES, 5, rtt) if p.name.startswith("flowtel_tcp_handshake")]
    assert [p.name for p in points] == ["flowtel_tcp_handshake_rtt_seconds"]
    (h,) = points
    assert (h.kind, h.unit, h.time_ns, h.attributes) == (MetricKind.HISTOGRAM, "s", 5, {})
    assert h.bounds == TCP_HANDSHAKE_RTT_BOUNDS and h.bounds[0] == 0.0001 and h.bounds[-1] == 5.0
    expected = [0] * (len(TCP_HANDSHAKE_RTT_BOUNDS) + 1)
    for bound in (0.0001, 0.0001, 0.0005, 0.025):
        expected[TCP_HANDSHAKE_RTT_BOUNDS.index(bound)] += 1
    expected[-1] += 1  # 7 s: past the last bound
    assert list(h.bucket_counts) == expected
    assert h.count == 5 and h.value == pytest.approx(0.00005 + 0.0001 + 0.0003 + 0.02 + 7.0)


def test_lost_deltas_report_growth_once() -> None:
    seen: dict[int, int] = {}
    assert list(decode.lost_deltas(decode.Counters((5, 0, 1, 9, 9, 9, 9, 9)), seen)) == [
        ("KERNEL_EVENTS_RING_BUFFER", 5), ("TCP_CONNECTION_TABLE_FULL", 1)]
    assert list(decode.lost_deltas(decode.Counters((5, 0, 1, 9, 9, 9, 9, 9)), seen)) == []
    assert list(decode.lost_deltas(decode.Counters((7, 0, 1, 9, 9, 9, 9, 9)), seen)) == [
        ("KERNEL_EVENTS_RING_BUFFER", 2)]


def test_v4_mapped_addresses_are_shown_as_ipv4() -> None:
    mapped = b"\x00" * 10 + b"\xff\xff" + socket.inet_aton("10.1.2.3")
    assert decode._address(6, mapped) == (4, "10.1.2.3")
    assert decode._address(6, socket.inet_pton(socket.AF_INET6, "fd00::1")) == (6, "fd00::1")
    assert decode._address(4, socket.inet_aton("10.0.0.9") + b"\x00" * 12) == (4, "10.0.0.9")
    assert decode._address(0, b"\x00" * 16) == (0, "")


def test_config_validation() -> None:
    cfg = KernelEventsConfig()
    assert cfg.enabled and cfg.drops.events and cfg.tcp.connection_events and cfg.ring_buffer_kb == 1024
    assert not KernelEventsConfig(drops={"enabled": False}, tcp={"enabled": False}).enabled
    assert KernelEventsConfig(collection_interval="30s").collection_interval == 30
    with pytest.raises(ValidationError, match="power of two"):
        KernelEventsConfig(ring_buffer_kb=1000)
    with pytest.raises(ValidationError, match="extra"):
        KernelEventsConfig(drops={"enable": True})
    with pytest.raises(ValidationError):
        KernelEventsConfig(tcp={"max_connections": 10})


# -- decoding real struct kernel_event bytes (the class comes from bcc, hence root) -------


@pytest.fixture(scope="module")
def event_class() -> Iterator[type[ctypes.Structure]]:
    from bcc import BPF

    import bpf as bpf_sources

    b = BPF(text='#include "flowtel.h"\nBPF_ARRAY(ev, struct kernel_event, 1);', cflags=bpf_sources.cflags())
    try:
        yield b["ev"].Leaf
    finally:
        b.cleanup()


def _event(cls: type[ctypes.Structure], **fields: object) -> bytes:
    ev = cls()
    for name, value in fields.items():
        if name in ("saddr", "daddr"):
            raw = bytes(value)  # type: ignore[call-overload]
            getattr(ev, name)[: len(raw)] = list(raw)
        else:
            setattr(ev, name, value)
    return bytes(ev)


@pytest.mark.kernel
def test_decoder(event_class: type[ctypes.Structure]) -> None:
    dec = decode.EventDecoder(event_class, NAMES, "node-1", host_netns=111,
                              ifname=lambda i: f"if{i}", symbol=lambda a: "tcp_v4_rcv" if a == 0xffff1 else "")
    v4 = socket.inet_aton
    mapped = b"\x00" * 10 + b"\xff\xff"
    data = b"".join([
        # A SYN dropped in the node's namespace, then one in a pod's.
        _event(event_class, kind=decode.KIND_DROP, time_ns=100, family=4, protocol=6, saddr=v4("10.0.0.1"),
               daddr=v4("10.0.0.2"), sport=1234, dport=80, reason=3, len=40, netns=111, ifindex=7,
               direction=0, tcp_flags=0x02, ethertype=0x0800, location=0xffff1),
        _event(event_class, kind=decode.KIND_DROP, time_ns=101, family=4, protocol=17, saddr=v4("10.0.0.1"),
               daddr=v4("10.0.0.3"), sport=5, dport=53, reason=12, len=60, netns=222, ifindex=2, direction=1,
               ethertype=0x0800),
        # A frame that is not IP.
        _event(event_class, kind=decode.KIND_DROP, time_ns=102, reason=2, len=42, ethertype=0x0806),
        # A dual-stack socket's reset, its addresses IPv4-mapped.
        _event(event_class, kind=decode.KIND_TCP_RESET_SENT, time_ns=103, family=6, protocol=6,
               saddr=mapped + v4("10.0.0.2"), daddr=mapped + v4("10.0.0.1"), sport=80, dport=1234, reason=12),
        _event(event_class, kind=decode.KIND_TCP_RETRANSMIT, time_ns=104, family=4, protocol=6, saddr=v4("10.0.0.1"),
               daddr=v4("10.0.0.2"), sport=1234, dport=80, len=3, error=-1, state=1),
        _event(event_class, kind=decode.KIND_TCP_ESTABLISHED, time_ns=105, family=4, value_ns=4200, state=1),
        _event(event_class, kind=decode.KIND_TCP_CLOSED, time_ns=106, family=4, value_ns=9, state=1, flags=0),
        _event(event_class, kind=decode.KIND_TCP_CLOSED, time_ns=107, family=4, value_ns=9, state=1,
               flags=decode.FLAG_LIFETIME),
        _event(event_class, kind=99, time_ns=108),  # a kind this version does not know: skipped
    ])
    flows = dec.decode(data, 1_000)
    assert len(flows) == 8
    syn, udp, arp, rst, rtx, est, closed_part, closed_whole = flows

    assert (syn.time_ns, syn.verdict, syn.drop_reason, syn.src_ip, syn.dst_port) == (1100, Verdict.DROPPED, "NO_SOCKET",
                                                                                    "10.0.0.1", 80)
    assert (syn.ifindex, syn.ifname, syn.packets, syn.bytes, syn.tcp_flags) == (7, "if7", 1, 40, 0x02)
    assert syn.extensions == {"drop_direction": "ingress", "drop_location": "tcp_v4_rcv", "netns_inode": 111}
    # Another namespace's ifindex would be misread as a node interface: extensions only.
    assert (udp.ifindex, udp.ifname) == (0, "")
    assert udp.extensions == {"drop_direction": "egress", "netns_inode": 222, "netns_ifindex": 2}
    assert (arp.ip_version, arp.ethertype, arp.protocol, arp.drop_reason) == (0, 0x0806, 0, "NOT_SPECIFIED")

    assert (rst.ip_version, rst.src_ip, rst.dst_ip, rst.tcp_flags) == (4, "10.0.0.2", "10.0.0.1", 0x04)
    assert rst.kind is EventKind.TCP_RESET_SENT and rst.extensions == {"reset_reason": "TCP_ABORT_ON_LINGER"}
    assert rst.verdict == Verdict.TRACED  # a socket event: observed, no verdict of its own
    assert syn.kind is EventKind.DROP
    assert rtx.kind is EventKind.TCP_RETRANSMIT
    assert rtx.extensions == {"tcp_state": "ESTABLISHED", "segments": 3, "retransmit_error": "EPERM"}
    assert est.kind is EventKind.TCP_ESTABLISHED
    assert est.extensions == {"tcp_state": "ESTABLISHED", "handshake_rtt_ns": 4200}
    # The decoder's RTT histogram has the one measured handshake (4.2 µs: the first bucket).
    rtt = decode.tcp_points({}, decode.Counters((0,) * decode.CNT_MAX), NAMES, 1, dec.rtt)[-1]
    assert (rtt.name, rtt.count, rtt.value) == ("flowtel_tcp_handshake_rtt_seconds", 1, pytest.approx(4.2e-6))
    assert rtt.bucket_counts[0] == 1
    assert "lifetime_ns" not in closed_part.extensions  # its birth was not seen: no lifetime
    assert closed_whole.extensions["lifetime_ns"] == 9
