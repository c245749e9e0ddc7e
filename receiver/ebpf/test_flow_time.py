"""Flow times come from a clock the tc program reads once per tick and CPU (bpf/tc_flow.c,
``flow_clock``), not per packet: a flow's time must still be when its last packet was seen,
within two ticks, and move on between packets sent apart in time.

Two UDP flows from one pod, sent 0.4 s apart; each record's time (its last packet's, on the
wall clock) must lie within the interval in which that flow's datagrams were sent, give or
take two ticks of the slowest kernel tick rate (HZ=100: 20 ms) and a margin for scheduling.
"""
from __future__ import annotations

import threading
import time

import pytest

from flowtel.component import CreateSettings, Telemetry
from flowtel.records import Flow, Record
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.receiver import EbpfReceiver
from testbed import Testbed, send_udp

pytestmark = pytest.mark.kernel

SLACK_NS = 30_000_000  # two ticks at HZ=100, and 10 ms for the sender's exit and scheduling


class _Collect:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def wants(self, signal: str) -> bool:
        return signal == "logs"

    def consume(self, batch: list[Record]) -> None:
        with self._lock:
            self.records.extend(batch)


def test_flow_time_is_its_last_packet_within_two_ticks() -> None:
    Testbed.cleanup_stale()
    with Testbed() as bed:
        a, b = bed.add_pod("clock-a"), bed.add_pod("clock-b")
        bed.start_udp_sink(b, 7001)
        bed.start_udp_sink(b, 7002)
        out = _Collect()
        config = EbpfReceiverConfig.model_validate({
            "interfaces": [bed.interface_glob], "collection_interval": 1.0, "dns": {"enabled": False},
            "kernel_events": {"drops": {"enabled": False}, "tcp": {"enabled": False}},
        })
        receiver = EbpfReceiver(CreateSettings("ebpf", "clock", Telemetry()), config, out)
        receiver.start()
        try:
            attach = receiver.attach_manager
            deadline = time.monotonic() + 10
            while attach is not None and len(attach.attached()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert attach is not None and len(attach.attached()) == 2
            windows = {}
            for port in (7001, 7002):
                start = time.time_ns()
                send_udp(a, b.ipv4, port, 200, 32, interval=0.001)
                windows[port] = (start, time.time_ns())
                time.sleep(0.4)
        finally:
            receiver.shutdown()  # drains what is left
    flows = [r for r in out.records if isinstance(r, Flow) and r.dst_port in windows and r.src_ip == a.ipv4]
    # One record per flow and veth (ingress of a's, egress of b's), maybe split across intervals.
    assert {(f.dst_port, f.ifname) for f in flows} == {(p, i) for p in windows for i in (a.host_ifname, b.host_ifname)}
    assert sum(f.packets for f in flows) == 2 * 2 * 200
    for f in flows:
        start, end = windows[f.dst_port]
        assert start - SLACK_NS <= f.time_ns <= end + SLACK_NS, (f.dst_port, f.ifname, start, f.time_ns, end)
    last = {p: max(f.time_ns for f in flows if f.dst_port == p) for p in windows}
    assert last[7002] - last[7001] >= 400_000_000 - SLACK_NS  # the cached clock moved on
