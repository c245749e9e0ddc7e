"""Decoding a drain (``EbpfReceiver._to_flows``) builds, for every raw flow, the record the
plain ``Flow(...)`` constructor gives for it: the fast path (positional build, per-batch
interface, address and flag-count lookups) changes nothing a consumer can see."""
from __future__ import annotations

import random
import socket
from typing import Any

import pytest

from flowtel.component import CreateSettings, Telemetry
from flowtel.lib.bpf.tcattach import Interface
from flowtel.records import EventKind, Flow, TcpFlagCounts, Verdict
from receiver.ebpf import receiver as ebpf_receiver
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.direction import traffic_direction
from receiver.ebpf.flowmap import RawFlow
from receiver.ebpf.receiver import EbpfReceiver
from receiver.ebpf.reply import ReplyInference


class _Attach:
    def __init__(self, ifaces: dict[int, Interface]) -> None:
        self.ifaces = ifaces

    def interface(self, ifindex: int) -> Interface | None:
        return self.ifaces.get(ifindex)


class _Null:
    def consume(self, batch: list[Any]) -> None:
        pass


def _raw(rng: random.Random) -> RawFlow:
    family = rng.choice((4, 4, 4, 6, 0))
    if family == 4:
        saddr = socket.inet_aton(f"10.0.{rng.randrange(3)}.{rng.randrange(1, 6)}") + bytes(12)
        daddr = socket.inet_aton(f"10.1.0.{rng.randrange(1, 6)}") + bytes(12)
    elif family == 6:
        saddr = socket.inet_pton(socket.AF_INET6, f"fd00::{rng.randrange(1, 9)}")
        daddr = socket.inet_pton(socket.AF_INET6, f"fd00:1::{rng.randrange(1, 9)}")
    else:
        saddr = daddr = bytes(16)
    protocol = rng.choice((6, 6, 17, 1)) if family else 0
    tcp = protocol == 6
    return RawFlow(saddr=saddr, daddr=daddr, ifindex=rng.choice((2, 7, 9, 40)), sport=rng.choice((80, 443, 40000, 51000)),
                   dport=rng.choice((80, 53, 40001, 60999)), ethertype=0x86DD if family == 6 else 0x0800 if family else 0x0806,
                   family=family, protocol=protocol, hook=rng.randrange(2), packets=rng.randrange(1, 100),
                   bytes=rng.randrange(60, 150_000), last_ns=10**12 + rng.randrange(10**9), tcp_flags=rng.randrange(256) if tcp else 0,
                   first_ns=10**12, syn=rng.choice((0, 0, 1, 3)) if tcp else 0, synack=rng.choice((0, 0, 1)) if tcp else 0,
                   fin=rng.choice((0, 1, 2)) if tcp else 0, rst=rng.choice((0, 0, 1)) if tcp else 0)


def _expected(r: RawFlow, node: str, offset: int, ifaces: dict[int, Interface], replies: ReplyInference) -> Flow:
    iface = ifaces.get(r.ifindex)
    if r.family == 4:
        src, dst = socket.inet_ntop(socket.AF_INET, r.saddr[:4]), socket.inet_ntop(socket.AF_INET, r.daddr[:4])
    elif r.family == 6:
        src, dst = socket.inet_ntop(socket.AF_INET6, r.saddr), socket.inet_ntop(socket.AF_INET6, r.daddr)
    else:
        src = dst = ""
    return Flow(
        time_ns=r.last_ns + offset, node_name=node, verdict=Verdict.FORWARDED, ip_version=r.family, src_ip=src,
        dst_ip=dst, protocol=r.protocol, src_port=r.sport, dst_port=r.dport, kind=EventKind.PACKET,
        traffic_direction=traffic_direction(iface, r.hook),
        is_reply=replies.is_reply(r.protocol, src, r.sport, dst, r.dport, r.syn, r.synack) if r.family else None,
        ethertype=r.ethertype, ifindex=r.ifindex, ifname=iface.name if iface is not None else "",
        packets=r.packets, bytes=r.bytes, tcp_flags=r.tcp_flags,
        tcp_flag_counts=TcpFlagCounts(r.syn, r.synack, r.fin, r.rst) if r.protocol == 6 else None)


def test_a_drain_decodes_to_the_records_the_constructor_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ebpf_receiver, "_monotonic_to_wall_offset", lambda: 5_000)
    ifaces = {2: Interface(2, "eth0", "device"), 7: Interface(7, "lxc7", "veth"), 9: Interface(9, "lxc9", "veth")}
    receiver = EbpfReceiver(CreateSettings("ebpf", "node-a", Telemetry()), EbpfReceiverConfig(), _Null())
    receiver._attach = _Attach(ifaces)  # type: ignore[assignment]  # _to_flows asks it only for interfaces
    rng = random.Random(17)
    replies = ReplyInference()
    for _ in range(3):  # several batches: the per-batch lookups start afresh, the reply memory does not
        raws = [_raw(rng) for _ in range(1000)]
        got = receiver._to_flows(raws)
        want = [_expected(r, "node-a", 5_000, ifaces, replies) for r in raws]
        assert got == want
        for g, w in zip(got, want):
            assert tuple(g[:-1]) == tuple(w[:-1]) and type(g) is Flow
            assert g.wire_memo is not w.wire_memo and g.wire_memo.form is None
        assert len({id(g.wire_memo) for g in got}) == len(got)  # each record encodes on its own
