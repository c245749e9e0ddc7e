"""Drop samples (``drops.events_per_second``): the config, what the loader compiles, decoding a
sample from real ``struct kernel_event`` bytes, and that nothing downstream counts a sample as
one more drop (hubblemetrics, the service graph, flowaggregate, the Hubble wire form and back).
The kernel end to end (budget bound, counts still exact) is receiver/ebpf/kernel_events/test_drop_samples_kernel.py.
"""
from __future__ import annotations

import ctypes
import socket
from typing import Iterator

import pytest
from pydantic import ValidationError

from connectors.hubblemetrics.config import HubbleMetricsConfig
from connectors.hubblemetrics.connector import HubbleMetricsConnector
from flowtel.component import CreateSettings, Telemetry
from flowtel.lib.hubble.convert import flow_json
from flowtel.lib.hubble.parse import flow_from_json
from flowtel.lib.hubble.printer import compact_line
from flowtel.records import EventKind, Flow, MetricPoint, Record, Verdict
from flowtel.recordtables import counts_as_hubble_flow
from flowtel.servicegraph import ServiceGraph
from processors.flowaggregate.config import FlowAggregateConfig
from processors.flowaggregate.processor import FlowAggregateProcessor
from receiver.ebpf.kernel_events import KernelEventsConfig, decode, program
from receiver.ebpf.kernel_events.config import MAX_DROP_EVENTS_PER_SECOND

NAMES = decode.Names(drop_reasons={2: "NOT_SPECIFIED", 3: "NO_SOCKET", 12: "NETFILTER_DROP"})
V4 = socket.inet_aton


def _drops() -> decode.DropDecoder:
    return decode.DropDecoder(NAMES, "node-1", host_netns=111, ifname=lambda i: f"if{i}",
                              symbol=lambda a: "tcp_v4_rcv" if a == 0xffff1 else "")


def test_config_default_off_and_validated() -> None:
    assert KernelEventsConfig().drops.events_per_second == 0
    assert KernelEventsConfig(drops={"events_per_second": 50}).drops.events_per_second == 50
    with pytest.raises(ValidationError, match="events_per_second is drop events per CPU per second: 0 .off. to"):
        KernelEventsConfig(drops={"events_per_second": -1})
    with pytest.raises(ValidationError, match="events_per_second"):
        KernelEventsConfig(drops={"events_per_second": MAX_DROP_EVENTS_PER_SECOND + 1})
    with pytest.raises(ValidationError):
        KernelEventsConfig(drops={"events_per_second": "lots"})


def test_loader_compiles_the_sample_path_only_when_asked_and_consumed() -> None:
    off, on = KernelEventsConfig(), KernelEventsConfig(drops={"events_per_second": 3})
    assert not program.drop_samples(off, events=True)
    assert program.drop_samples(on, events=True)
    assert not program.drop_samples(on, events=False)  # no logs pipeline: nobody reads samples
    assert not program.drop_samples(KernelEventsConfig(drops={"enabled": False, "events_per_second": 3}), events=True)
    # Rounded up, so a CPU never exceeds the rate in the long run; the bucket (rate * cost,
    # about one second) holds a burst of exactly `rate` samples.
    assert program.drop_sample_cost_ns(3) == 333_333_334
    for rate in (1, 3, 7, 1000, MAX_DROP_EVENTS_PER_SECOND):
        cost = program.drop_sample_cost_ns(rate)
        assert 1_000_000_000 / cost <= rate and 1_000_000_000 <= cost * rate < 1_000_000_000 + rate
    assert program.drop_sample_cost_ns(0) == 0


def sample(**over: object) -> Flow:
    base: dict[str, object] = dict(
        family=4, saddr=V4("10.0.0.1") + b"\0" * 12, daddr=V4("10.0.0.2") + b"\0" * 12, sport=1234, dport=80,
        protocol=6, ethertype=0x0800, netns=222, ifindex=2, direction=0, reason=3, location=0xffff1, packets=1,
        nbytes=60, tcp_flags=0x02, time_ns=5_000, sample=True, tcp_seq=4_000_000_000)
    base.update(over)
    return _drops().flow(**base)  # type: ignore[arg-type]


def test_a_sample_is_marked_and_carries_its_detail() -> None:
    s = sample()
    assert s.kind is EventKind.DROP_SAMPLE and s.verdict == Verdict.DROPPED and not s.is_packets
    assert (s.packets, s.bytes, s.tcp_flags, s.time_ns, s.drop_reason) == (1, 60, 0x02, 5_000, "NO_SOCKET")
    assert s.extensions == {"drop_direction": "ingress", "drop_location": "tcp_v4_rcv", "netns_inode": 222,
                            "netns_ifindex": 2, "skb_len": 60, "tcp_seq": 4_000_000_000}
    # On Hubble's wire: a drop, marked, with no Retina counts a consumer could add twice.
    wire = flow_json(s)
    assert wire["verdict"] == "DROPPED" and wire["event_type"]["type"] == 1
    ext = wire["extensions"]["value"]
    assert ext["drop_sample"] is True and "packets" not in ext and "bytes" not in ext
    assert ext["tcp_seq"] == 4_000_000_000 and ext["skb_len"] == 60
    back = flow_from_json(wire)
    assert back.kind is EventKind.DROP_SAMPLE and (back.packets, back.bytes) == (1, 60)
    assert back.extensions == s.extensions  # drop_sample is derived from the kind, not copied
    # An aggregated drop stays a drop through the same round trip.
    agg = sample(sample=False, tcp_seq=None, packets=7, nbytes=420)
    assert flow_from_json(flow_json(agg)).kind is EventKind.DROP
    assert "drop_sample" not in flow_json(agg)["extensions"]["value"]
    assert compact_line(s).endswith(" sample") and "pkts=" not in compact_line(s)
    assert "pkts=7" in compact_line(agg)


class _Capture:
    def __init__(self) -> None:
        self.got: list[Record] = []

    def wants(self, signal: str) -> bool:
        return True

    def consume(self, batch: list[Record]) -> None:
        self.got.extend(batch)


def test_samples_are_counted_nowhere() -> None:
    agg = sample(sample=False, tcp_seq=None, packets=5, nbytes=300)
    samples = [sample(time_ns=5_000 + i) for i in range(3)]
    assert counts_as_hubble_flow(agg) and not any(counts_as_hubble_flow(s) for s in samples)

    def hubble(records: list[Record]) -> dict[str, float]:
        capture = _Capture()
        conn = HubbleMetricsConnector(CreateSettings("hubblemetrics", "node-1", Telemetry()),
                                      HubbleMetricsConfig(metrics=["drop", "flow"], version_info=False), capture)
        conn.consume(records)
        conn.shutdown()
        out: dict[str, float] = {}
        for p in capture.got:
            if isinstance(p, MetricPoint):
                out[p.name] = out.get(p.name, 0) + p.value
        return out

    assert hubble([agg, *samples]) == hubble([agg]) == {"hubble_drop_total": 5, "hubble_flows_processed_total": 5}

    graph = ServiceGraph()
    graph.add([agg, *samples])
    ((_, stats),) = graph.snapshot()
    assert (stats.flows, stats.dropped, stats.packets) == (1, 5, 5)

    proc = FlowAggregateProcessor(CreateSettings("flowaggregate", "n", Telemetry()), FlowAggregateConfig(),
                                  clock=lambda: 0)
    # Samples pass through as the events they are; only the drop flow is aggregated.
    passed = proc.process([agg, *samples])
    assert [f for f in passed if isinstance(f, Flow)] == samples


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
def test_decoder_turns_drop_events_into_samples(event_class: type[ctypes.Structure]) -> None:
    drop = dict(kind=decode.KIND_DROP, time_ns=100, family=4, protocol=6, saddr=V4("10.0.0.1"), daddr=V4("10.0.0.2"),
                sport=1234, dport=80, reason=12, len=52, netns=111, ifindex=7, direction=1, ethertype=0x0800,
                location=0xffff1, tcp_flags=0x12)
    data = b"".join([
        _event(event_class, **drop, value_ns=77, flags=decode.FLAG_TCP_SEQ),
        _event(event_class, **{**drop, "protocol": 17, "tcp_flags": 0, "time_ns": 101}),  # no sequence number
    ])
    # Without a drop decoder (samples off) drop events are not records.
    assert decode.EventDecoder(event_class, NAMES, "node-1").decode(data, 1_000) == []
    tcp, udp = decode.EventDecoder(event_class, NAMES, "node-1", _drops()).decode(data, 1_000)
    assert tcp.kind is EventKind.DROP_SAMPLE and tcp.time_ns == 1_100 and tcp.drop_reason == "NETFILTER_DROP"
    assert (tcp.src_ip, tcp.dst_ip, tcp.src_port, tcp.dst_port, tcp.packets, tcp.bytes) == (
        "10.0.0.1", "10.0.0.2", 1234, 80, 1, 52)
    assert (tcp.ifindex, tcp.ifname, tcp.tcp_flags) == (7, "if7", 0x12)  # the node's own namespace
    assert tcp.extensions == {"drop_direction": "egress", "drop_location": "tcp_v4_rcv", "netns_inode": 111,
                              "skb_len": 52, "tcp_seq": 77}
    assert udp.protocol == 17 and "tcp_seq" not in udp.extensions and udp.time_ns == 1_101
