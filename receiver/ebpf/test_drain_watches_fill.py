"""A burst of new flows while a drain waits for a slow pipeline does not overflow the other buffer.

A drain hands its flows on a chunk at a time, each once the pipeline consumed the previous one;
with a slow exporter that takes seconds, and meanwhile every new flow goes to the other buffer.
The drain loop must keep reading that buffer's fill during the wait and swap again past
``drain_at_fill`` (the first drain's flows are already out of the kernel, so the second flip
loses and duplicates nothing). Before, the fill was not read until the drain was over, and the
burst overflowed the other map: ``FLOW_MAP_FULL`` (counted, but the flows were lost).

Workload: UDP datagrams paced at ``RATE``/s, each from a new source port, so each is a new key on
the two host-side veths it crosses (no reply: the sink pod's socket never reads). The exporter
takes 0.5 s a batch of ``CHUNK``. Truth: per host-side veth and direction, the flows' packets and
bytes equal ``ip -s link``; each datagram's two keys are reported exactly once.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

import receiver.ebpf.receiver as ebpf_receiver
from flowtel.component import ComponentConfig, CreateSettings, Exporter, ExporterFactory, Kind
from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.records import Flow, LostEvents, Record
from flowtel.registry import factories_by_kind
from testbed import Testbed
from tests.support.link_truth import flow_totals, link_totals

pytestmark = pytest.mark.kernel

MAX_FLOWS = 16384  # drained early at 8192
DATAGRAMS = 16_000  # 32 000 keys: two maps' worth, arriving while the first drain is handed on
RATE = 4000  # datagrams/s: 8000 keys/s, 1600 between two fill reads (the map has 8192 of room)
CHUNK = 1000
SINK_PORT = 9000
FIRST_PORT = 20000

_SEND_PACED = """
import socket, sys, time
dst, port, n, rate, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
start = time.monotonic()
for i in range(n):
    ahead = start + i / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", first + i))  # a new flow key per datagram
    s.sendto(b"x" * 32, (dst, port))
    s.close()
"""

# A bound socket nobody reads: the datagrams are dropped at its full buffer, without an ICMP reply.
_DEAF_SINK = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
time.sleep(3600)
"""


class _SlowMemory(Exporter):
    """Keeps every record; takes 0.5 s a batch (an exporter behind a slow backend)."""

    def __init__(self, settings: CreateSettings, config: ComponentConfig) -> None:
        super().__init__(settings)
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def consume(self, batch: list[Record]) -> None:
        time.sleep(0.5)
        with self._lock:
            self.records.extend(batch)


def test_burst_during_a_slow_drain_is_drained_early_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ebpf_receiver, "DRAIN_CHUNK_RECORDS", CHUNK)
    factories = factories_by_kind()
    factories[Kind.EXPORTER]["slowmemory"] = ExporterFactory("slowmemory", ComponentConfig, _SlowMemory,
                                                             signals=("logs",))
    Testbed.cleanup_stale()
    with Testbed() as bed:
        a, b = bed.add_pod("burst-c"), bed.add_pod("burst-s")
        config = parse_config(
            {
                "receivers": {
                    "ebpf": {
                        "interfaces": [bed.interface_glob],
                        "collection_interval": "60s",  # no scheduled drain during the test
                        "max_flows": MAX_FLOWS,
                        "drain_at_fill": 0.5,
                        "dns": {"enabled": False},
                        "kernel_events": {"drops": {"enabled": False}, "tcp": {"enabled": False}},
                    }
                },
                "exporters": {"slowmemory": {}},
                "service": {"pipelines": {"logs": {"receivers": ["ebpf"], "exporters": ["slowmemory"]}}},
            },
            "<test>",
            factories=factories,
        )
        sink = b.popen([sys.executable, "-c", _DEAF_SINK, str(SINK_PORT)], stdout=subprocess.PIPE, text=True)
        service = Service(config, node_name="test-node", factories=factories)
        try:
            assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
            before = {p.name: bed.link_stats(p) for p in (a, b)}
            service.start()
            try:
                receiver = service.receivers["ebpf"]
                time.sleep(0.5)  # attached
                a.exec([sys.executable, "-c", _SEND_PACED, b.ipv4, str(SINK_PORT), str(DATAGRAMS), str(RATE),
                        str(FIRST_PORT)], timeout=120)
                time.sleep(1.0)
                after = {p.name: bed.link_stats(p) for p in (a, b)}  # the quiet testbed sends nothing more
                # The early drains' flows go on through the slow exporter for seconds after the
                # burst: wait until they are through (no new batch for 3 s; one takes 0.5 s), so
                # that shutdown's final drain has only the active map's rest to hand on.
                exporter = service.exporters["slowmemory"]
                assert isinstance(exporter, _SlowMemory)
                deadline, seen, since = time.monotonic() + 120, -1, time.monotonic()
                while time.monotonic() - since < 3.0:
                    assert time.monotonic() < deadline, len(exporter.records)
                    if len(exporter.records) != seen:
                        seen, since = len(exporter.records), time.monotonic()
                    time.sleep(0.1)
                early = receiver.settings.telemetry.get(receiver.settings.id, "early_drains")
            finally:
                service.shutdown(timeout=120)
        finally:
            sink.kill()
            sink.wait(10)

        records = exporter.records
        flows = [r for r in records if isinstance(r, Flow)]
        lost = {r.source: r.count for r in records if isinstance(r, LostEvents)}
        ours = [f for f in flows if f.protocol == 17 and f.dst_port == SINK_PORT and f.src_ip == a.ipv4]
        keys = {(f.ifindex, f.src_port) for f in ours}
        why = (f"{early} early drains, lost {lost}, {len(ours)} records, {len(keys)} keys, "
               f"timed-out waits {service.telemetry.snapshot().get(('ebpf', 'drain_waits_timed_out'), 0)}")
        print(why)
        assert lost == {}, why
        # More than one early drain: the later ones happened while an earlier one was handed on
        # (the first drain's hand-on alone takes 8 x 0.5 s, the whole burst 4 s).
        assert 2 <= early <= 8, why
        # Each datagram's two keys exactly once: nothing lost, nothing handed on twice.
        assert len(keys) == len(ours) == 2 * DATAGRAMS, why
        for pod in (a, b):
            d = after[pod.name] - before[pod.name]
            got, want = flow_totals(flows, pod.host_ifindex), link_totals(d)
            assert got == want, (pod.name, got, want, why)
