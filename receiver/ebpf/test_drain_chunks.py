"""One interval's drain goes through the pipeline a chunk at a time, and stays exact.

6000 distinct flows (3000 UDP datagrams from distinct source ports, seen on two veths) land in
one interval; the drain hands them on in chunks of 1000 (the constant lowered for the test), each
handed on only once the previous one went through the pipeline into the exporter. The exporter is
slow on purpose, so without the wait every chunk would pile up in the queues. Checked: no batch
is larger than a chunk, the exporter never has a second chunk waiting behind the one it holds,
and the flows' packets equal the veths' own counters (``ip -s link``) per interface and hook.
"""
from __future__ import annotations

import sys
import threading
import time

import pytest

import receiver.ebpf.receiver as ebpf_receiver
from flowtel.component import ComponentConfig, CreateSettings, Exporter, ExporterFactory, Kind
from flowtel.config import parse_config
from flowtel.pipeline import BoundedQueue, Service
from flowtel.records import Flow, LostEvents, Record
from flowtel.registry import factories_by_kind
from testbed import Testbed
from tests.support.link_truth import flow_totals, link_totals

pytestmark = pytest.mark.kernel

DATAGRAMS = 3000
CHUNK = 1000
SINK_PORT = 9000

_SEND_FROM_MANY_PORTS = """
import socket, sys
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 21000 + i))  # a distinct flow key per datagram
    s.sendto(b"x" * 32, (dst, port))
    s.close()
"""


class _SlowMemory(Exporter):
    """Keeps every record; takes 0.2 s a batch and notes what waited behind each one."""

    queue: BoundedQueue | None = None

    def __init__(self, settings: CreateSettings, config: ComponentConfig) -> None:
        super().__init__(settings)
        self.records: list[Record] = []
        self.batch_sizes: list[int] = []
        self.waiting_behind: list[int] = []
        self._lock = threading.Lock()

    def consume(self, batch: list[Record]) -> None:
        time.sleep(0.2)
        with self._lock:
            self.records.extend(batch)
            self.batch_sizes.append(len(batch))
            if _SlowMemory.queue is not None:
                self.waiting_behind.append(len(_SlowMemory.queue))


def test_drain_hands_on_chunk_by_chunk_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ebpf_receiver, "DRAIN_CHUNK_RECORDS", CHUNK)
    factories = factories_by_kind()
    factories[Kind.EXPORTER]["slowmemory"] = ExporterFactory("slowmemory", ComponentConfig, _SlowMemory,
                                                             signals=("logs",))
    Testbed.cleanup_stale()
    with Testbed() as bed:
        a, b = bed.add_pod("sender"), bed.add_pod("sink")
        bed.start_udp_sink(b, SINK_PORT)
        config = parse_config(
            {
                "receivers": {
                    "ebpf": {
                        "interfaces": [bed.interface_glob],
                        "collection_interval": "3s",
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
        service = Service(config, node_name="test-node", factories=factories)
        _SlowMemory.queue = service._exporter_workers["slowmemory"].queue
        before = {p.name: bed.link_stats(p) for p in (a, b)}
        service.start()
        try:
            a.exec([sys.executable, "-c", _SEND_FROM_MANY_PORTS, b.ipv4, str(SINK_PORT), str(DATAGRAMS)], timeout=120)
            time.sleep(4)  # at least one interval's drain of all 6000 flows, through the slow exporter
            after = {p.name: bed.link_stats(p) for p in (a, b)}  # the quiet testbed sends nothing more
        finally:
            service.shutdown(timeout=60)
            _SlowMemory.queue = None

        exporter = service.exporters["slowmemory"]
        assert isinstance(exporter, _SlowMemory)
        records = exporter.records
        assert not [r for r in records if isinstance(r, LostEvents)]
        flows = [r for r in records if isinstance(r, Flow)]
        assert len(flows) >= 2 * DATAGRAMS  # the sender's own flows, plus whatever else the veths carried
        assert max(exporter.batch_sizes) <= CHUNK
        assert sum(1 for n in exporter.batch_sizes if n == CHUNK) >= 2 * DATAGRAMS // CHUNK - 1
        # The drain handed each chunk on after the previous one reached the exporter: never a
        # second chunk queued behind the one being exported.
        assert max(exporter.waiting_behind) < CHUNK, exporter.waiting_behind
        assert service.telemetry.snapshot().get(("ebpf", "drain_waits_timed_out"), 0) == 0
        for pod in (a, b):
            d = after[pod.name] - before[pod.name]
            # Packets (the chunks' test; the byte totals are other tests' business).
            got = {direction: packets for direction, (packets, _) in flow_totals(flows, pod.host_ifindex).items()}
            assert got == {direction: packets for direction, (packets, _) in link_totals(d).items()}, pod.name
