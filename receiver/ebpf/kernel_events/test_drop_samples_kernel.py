"""Drop samples on the real kernel: a per-CPU budget the kernel enforces, while the counts stay
exact (the aggregated drop flows still equal the kernel's UdpRcvbufErrors, and no sample is
counted as one more drop by hubblemetrics).

The drop tracepoint is global: samples are spent on every drop of this machine (concurrent test
runs included), so the budget bound is checked on all samples, and "ours" only as > 0.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from connectors.hubblemetrics.config import HubbleMetricsConfig
from connectors.hubblemetrics.connector import HubbleMetricsConnector
from flowtel.component import CreateSettings, Telemetry
from flowtel.records import TCP_SYN, EventKind, Flow, LostEvents, MetricPoint, Record, Verdict
from receiver.ebpf.kernel_events import KernelEvents, KernelEventsConfig, decode
from receiver.ebpf.kernel_events.config import MAX_DROP_EVENTS_PER_SECOND
from testbed import Testbed, capture
from tests.support.kernel_events import CONNECT_REFUSED, FLOOD, FULL_SOCKET, Collector, udp_mib, udp_sendto

pytestmark = pytest.mark.kernel

BUDGET = 20  # drop samples per CPU per second


class _Metrics:
    def __init__(self) -> None:
        self.points: list[MetricPoint] = []

    def wants(self, signal: str) -> bool:
        return signal == "metrics"

    def consume(self, batch: list[Record]) -> None:
        self.points.extend(p for p in batch if isinstance(p, MetricPoint))


def hubble_drops(records: list[Flow]) -> float:
    """hubble_drop_total over ``records``, as the hubblemetrics connector counts it."""
    out = _Metrics()
    conn = HubbleMetricsConnector(CreateSettings("hubblemetrics", "test-node", Telemetry()),
                                  HubbleMetricsConfig(metrics=["drop"], version_info=False), out)
    conn.consume(list(records))
    conn.shutdown()
    return sum(p.value for p in out.points if p.name == "hubble_drop_total")


def test_drop_samples_are_bounded_per_cpu_and_counts_stay_exact(bed: Testbed) -> None:
    sink, telemetry = Collector(), Telemetry()
    ke = KernelEvents(KernelEventsConfig(collection_interval=0.5, poll_interval=0.05, tcp={"enabled": False},
                                         drops={"events_per_second": BUDGET}), "test-node", telemetry, sink)
    a, b = bed.add_pod("smp-a"), bed.add_pod("smp-b")
    port = 47300
    server = b.popen([sys.executable, "-c", FULL_SOCKET, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        before = udp_mib(b)
        attached, wall0 = time.monotonic(), time.time_ns()
        ke.start()
        try:
            sent = int(a.exec([sys.executable, "-c", FLOOD, b.ipv4, str(port), "2"], timeout=60).stdout)
            rcvbuf_errors = udp_mib(b)["RcvbufErrors"] - before["RcvbufErrors"]
        finally:
            ke.stop()  # detaches, then drains the ring and the drop flow maps: every record is in
            detached, wall1 = time.monotonic(), time.time_ns()
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(10)
    assert rcvbuf_errors > 20_000, f"the flood was too slow to prove anything ({rcvbuf_errors} drops of {sent})"

    def ours(f: Flow) -> bool:
        return (f.verdict == Verdict.DROPPED and f.src_ip == a.ipv4 and f.dst_ip == b.ipv4 and f.dst_port == port
                and f.drop_reason == "SOCKET_RCVBUFF")

    samples = sink.flows(lambda f: f.kind is EventKind.DROP_SAMPLE)
    our_samples = [f for f in samples if ours(f)]
    our_flows = sink.flows(lambda f: ours(f) and f.kind is EventKind.DROP)
    counters = ke.counters()
    seconds = detached - attached
    cpus = os.cpu_count() or 1
    print(f"drop samples: {len(samples)} ({len(our_samples)} ours) of {rcvbuf_errors} flood drops in {seconds:.2f} s; "
          f"suppressed {counters[decode.CNT_DROP_SAMPLES_SUPPRESSED]}; bound {BUDGET * cpus * (seconds + 1):.0f}")

    # The budget, enforced in the kernel: at most BUDGET per CPU per second, plus one burst.
    assert 0 < len(our_samples) <= len(samples) <= BUDGET * cpus * (seconds + 1)
    # Every sample written was delivered (the kernel counts what it wrote), none lost to the ring.
    assert counters[decode.CNT_RINGBUF_FULL] == 0
    assert len(samples) == counters[decode.CNT_DROP_SAMPLES]
    # The flood's other drops were held back by the budget and counted as such, not lost:
    # every drop the program counted (final node totals, read after detaching) was either
    # sampled or suppressed.
    assert counters[decode.CNT_DROP_SAMPLES_SUPPRESSED] >= rcvbuf_errors - len(our_samples)
    final: dict[tuple[tuple[str, str], ...], float] = {}
    for p in sink.records:
        if isinstance(p, MetricPoint) and p.name == "networkobservability_drop_count":
            final[tuple(sorted(p.attributes.items()))] = p.value  # cumulative: the last one holds
    assert sum(final.values()) == counters[decode.CNT_DROP_SAMPLES] + counters[decode.CNT_DROP_SAMPLES_SUPPRESSED]
    # The same counts as self-telemetry (flowtel_component_drop_samples{,_suppressed}) and metrics.
    snapshot = telemetry.snapshot()
    assert snapshot[("ebpf", "drop_samples")] == counters[decode.CNT_DROP_SAMPLES]
    assert snapshot[("ebpf", "drop_samples_suppressed")] == counters[decode.CNT_DROP_SAMPLES_SUPPRESSED]
    last = {p.name: p.value for p in sink.records if isinstance(p, MetricPoint)}
    assert last["flowtel_drop_samples_suppressed_total"] == counters[decode.CNT_DROP_SAMPLES_SUPPRESSED]
    assert last["flowtel_drop_samples_total"] == counters[decode.CNT_DROP_SAMPLES]
    assert not any(isinstance(r, LostEvents) for r in sink.records)

    # Counts stay exact: the aggregated drop flows count every drop, the sampled ones included,
    # and the samples add nothing to hubble_drop_total.
    assert sum(f.packets for f in our_flows) == rcvbuf_errors
    assert hubble_drops(our_flows + our_samples) == rcvbuf_errors

    # A sample is one drop with its own time (while the programs were attached) and detail.
    times = [s.time_ns for s in our_samples]
    assert len(set(times)) == len(times) and all(wall0 - 50_000_000 <= t <= wall1 + 50_000_000 for t in times)
    for s in our_samples:
        assert (s.packets, s.bytes, s.extensions["skb_len"]) == (1, 18, 18)
        assert s.extensions["drop_direction"] == "ingress" and s.extensions["drop_location"]


def test_no_samples_by_default(bed: Testbed) -> None:
    sink = Collector()
    ke = KernelEvents(KernelEventsConfig(collection_interval=0.5, poll_interval=0.05, tcp={"enabled": False}),
                      "test-node", Telemetry(), sink)
    ke.start()
    try:
        a, b = bed.add_pod("nosmp-a"), bed.add_pod("nosmp-b")
        src_port, _ = udp_sendto(a, b.ipv4, 47310, 25, 40)  # no socket there: 25 NO_SOCKET drops

        def ours(f: Flow) -> bool:
            return f.src_ip == a.ipv4 and f.dst_ip == b.ipv4 and f.dst_port == 47310

        deadline = time.monotonic() + 10
        while sum(f.packets for f in sink.flows(ours)) < 25 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        ke.stop()
    assert sum(f.packets for f in sink.flows(lambda f: ours(f) and f.kind is EventKind.DROP)) == 25
    # The sample path is compiled out: no sample of any drop on the node, nothing counted for it.
    assert sink.flows(lambda f: f.kind is EventKind.DROP_SAMPLE) == []
    counters = ke.counters()
    assert counters[decode.CNT_DROP_SAMPLES] == counters[decode.CNT_DROP_SAMPLES_SUPPRESSED] == 0
    assert not any(p.name.startswith("flowtel_drop_samples") for p in sink.records if isinstance(p, MetricPoint))


def test_a_tcp_drop_sample_is_that_segment(bed: Testbed) -> None:
    """SYNs to a closed port, each dropped (NO_SOCKET) in the receiving pod: each sample carries
    that SYN's sequence number and flags as tcpdump saw the segment on the pod's veth, and a
    time within milliseconds of it."""
    sink = Collector()
    # The largest budget: the drops of a concurrent flood elsewhere on the node spend it too.
    ke = KernelEvents(KernelEventsConfig(collection_interval=0.5, poll_interval=0.05, tcp={"enabled": False},
                                         drops={"events_per_second": MAX_DROP_EVENTS_PER_SECOND}),
                      "test-node", Telemetry(), sink)
    ke.start()
    try:
        a, b = bed.add_pod("tsmp-a"), bed.add_pod("tsmp-b")
        port = 47320
        with capture(b, filter_expr=f"tcp dst port {port}") as lines:
            refused = json.loads(a.exec([sys.executable, "-c", CONNECT_REFUSED, b.ipv4, str(port), "3"]).stdout)
        sink.wait_flows(lambda f: f.kind is EventKind.DROP_SAMPLE and f.dst_port == port and f.src_ip == a.ipv4, 3)
    finally:
        ke.stop()
    seen: dict[int, tuple[int, int]] = {}  # source port -> (seq, time ns) of its SYN
    for line in lines:
        m = re.search(rf"{re.escape(a.ipv4)}\.(\d+) > {re.escape(b.ipv4)}\.{port}: Flags \[S\], seq (\d+)", line)
        if m:
            seen[int(m.group(1))] = (int(m.group(2)), round(float(line.split()[0]) * 1e9))
    assert sorted(seen) == sorted(refused)
    samples = sink.flows(lambda f: f.kind is EventKind.DROP_SAMPLE and f.dst_port == port and f.src_ip == a.ipv4)
    # All three, unless the budget was spent on other drops (then counted as suppressed).
    assert samples and {s.src_port for s in samples} <= set(refused) and len({s.src_port for s in samples}) == len(samples)
    assert len(samples) == 3 or ke.counters()[decode.CNT_DROP_SAMPLES_SUPPRESSED] > 0
    for s in samples:
        seq, when = seen[s.src_port]
        assert (s.drop_reason, s.protocol, s.tcp_flags, s.extensions["tcp_seq"]) == ("NO_SOCKET", 6, TCP_SYN, seq)
        assert abs(s.time_ns - when) < 50_000_000  # two clocks (tcpdump's, CLOCK_MONOTONIC + offset)
