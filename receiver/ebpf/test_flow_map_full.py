"""A full flow map is counted, never silent, and per-interface totals stay exact.

3000 UDP datagrams, each from its own source port, make 3000 distinct flows on each of two
veths (6000 keys) within one collection interval, against a map of 1024 entries: the LRU
evicts, and every evicted flow must come back as a ``FLOW_MAP_FULL`` lost-events count.
The kernel-side interface totals (per-CPU, per interface slot) do not depend on the flow map and must
still equal ``ip -s link`` exactly.
"""
from __future__ import annotations

import sys
import time

import pytest

from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.records import Flow, LostEvents
from tests.support.memory_exporter import factories_with_memory
from testbed import Testbed

pytestmark = pytest.mark.kernel

DATAGRAMS = 3000
SINK_PORT = 9000

_SEND_FROM_MANY_PORTS = """
import socket, sys
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # An explicit, distinct source port per datagram: ephemeral ports get reused, and a
    # reused port would be the same flow key, not a new one.
    s.bind(("0.0.0.0", 20000 + i))
    s.sendto(b"x" * 32, (dst, port))
    s.close()
"""


def test_evictions_are_counted_and_interface_totals_stay_exact() -> None:
    factories = factories_with_memory()
    Testbed.cleanup_stale()
    with Testbed() as bed:
        a, b = bed.add_pod("sender"), bed.add_pod("sink")
        bed.start_udp_sink(b, SINK_PORT)
        config = parse_config(
            {
                "receivers": {
                    "ebpf": {
                        "interfaces": [bed.interface_glob],
                        "collection_interval": "30s",  # everything lands in one interval
                        "max_flows": 1024,
                        "dns": {"enabled": False},
                        "kernel_events": {"drops": {"enabled": False}, "tcp": {"enabled": False}},
                    }
                },
                "exporters": {"memory": {}},
                "service": {"pipelines": {"logs": {"receivers": ["ebpf"], "exporters": ["memory"]}}},
            },
            "<test>",
            factories=factories,
        )
        service = Service(config, node_name="test-node", factories=factories)
        before = {p.name: bed.link_stats(p) for p in (a, b)}
        service.start()
        try:
            receiver = service.receivers["ebpf"]
            a.exec([sys.executable, "-c", _SEND_FROM_MANY_PORTS, b.ipv4, str(SINK_PORT), str(DATAGRAMS)], timeout=120)
            time.sleep(0.2)
            # Interface totals live beside the flow maps, so evictions cannot touch them.
            totals = receiver.interface_totals()
            mid = {p.name: bed.link_stats(p) for p in (a, b)}
        finally:
            service.shutdown()

        records = service.exporters["memory"].records
        flows = [r for r in records if isinstance(r, Flow) and r.protocol == 17 and r.dst_port == SINK_PORT]
        lost = {src: sum(r.count for r in records if isinstance(r, LostEvents) and r.source == src)
                for src in ("FLOW_MAP_FULL", "FLOW_MAP_UPDATE_FAILED")}
        assert lost["FLOW_MAP_FULL"] > 0, "a map of 1024 entries cannot hold 6000 flows: evictions must be reported"
        # Every key was created once (one interval, nothing else on these veths): each one is
        # reported, or counted as an evicted flow, or — when the LRU had no free node to give
        # the insert at all — counted as an uncounted packet (one packet per flow here).
        assert len(flows) + lost["FLOW_MAP_FULL"] + lost["FLOW_MAP_UPDATE_FAILED"] == 2 * DATAGRAMS
        assert sum(f.packets for f in flows) == len(flows)  # one datagram per flow

        # Hook 0 is tc ingress: what a host-side veth received (what its pod sent).
        for pod in (a, b):
            d = mid[pod.name] - before[pod.name]
            assert totals.get((pod.host_ifindex, 0), (0, 0)) == (d.rx_packets, d.rx_bytes), pod.name
            assert totals.get((pod.host_ifindex, 1), (0, 0)) == (d.tx_packets, d.tx_bytes), pod.name
        assert (mid["sender"] - before["sender"]).rx_packets == DATAGRAMS
