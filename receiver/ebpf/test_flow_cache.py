"""The tc program's per-CPU "last flow" cache (bpf/tc_flow.c, ``struct flow_cache_entry``) loses
nothing across drains.

A bulk TCP stream and a 64-byte UDP flood (iperf3) are the same key packet after packet, so
their counts sit in the cache, not the flow map, most of the time; the collection interval is
0.2 s, so the active buffer flips dozens of times in mid-flood. Checked against the kernel's own
counters: per host-side veth and direction, the flows' packets and bytes equal ``ip -s link``
exactly, and the TCP flag counts equal the connections iperf3 opened (each SYN counted once on
each veth it crossed).
"""
from __future__ import annotations

import time

import pytest

from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.records import Flow, LostEvents
from tests.support.memory_exporter import MemoryExporter, factories_with_memory
from testbed import Testbed, require_tool
from tests.support.link_truth import flow_totals, link_totals

pytestmark = pytest.mark.kernel

PORT = 5201  # in the server pod's own network namespace
SECONDS = 2


def test_bulk_flows_through_the_cache_equal_the_link_counters_across_flips() -> None:
    require_tool("iperf3")
    factories = factories_with_memory()
    Testbed.cleanup_stale()
    with Testbed() as bed:
        client, server = bed.add_pod("client"), bed.add_pod("server")
        config = parse_config(
            {
                "receivers": {
                    "ebpf": {
                        "interfaces": [bed.interface_glob],
                        "collection_interval": "0.2s",
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
        iperf = server.popen(["iperf3", "-s", "-p", str(PORT)])
        time.sleep(0.5)
        before = {p.name: bed.link_stats(p) for p in (client, server)}
        service.start()
        try:
            time.sleep(1.0)  # attached
            client.exec(["iperf3", "-c", server.ipv4, "-p", str(PORT), "-t", str(SECONDS)], timeout=60)
            client.exec(["iperf3", "-c", server.ipv4, "-p", str(PORT), "-t", str(SECONDS),
                         "-u", "-b", "0", "-l", "64"], timeout=60)
            time.sleep(0.5)  # the last packets' interval drains
            after = {p.name: bed.link_stats(p) for p in (client, server)}  # the quiet testbed sends nothing more
        finally:
            iperf.terminate()
            iperf.wait(timeout=10)
            service.shutdown(timeout=60)

        exporter = service.exporters["memory"]
        assert isinstance(exporter, MemoryExporter)
        assert not [r for r in exporter.records if isinstance(r, LostEvents)]
        flows = [r for r in exporter.records if isinstance(r, Flow)]
        for pod in (client, server):
            d = after[pod.name] - before[pod.name]
            assert d.rx_packets + d.tx_packets > 20_000, (pod.name, d)  # a flood, not a trickle
            assert flow_totals(flows, pod.host_ifindex) == link_totals(d), pod.name

        # iperf3 opened two TCP connections per run (control and data; the UDP run's control
        # connection too): three SYNs from the client and three SYN-ACKs from the server, each
        # counted once on each veth it crossed, whatever drain its packet fell into.
        def flag_total(pod_ifindex: int, src: str, name: str) -> int:
            return sum(getattr(f.tcp_flag_counts, name) for f in flows
                       if f.protocol == 6 and f.ifindex == pod_ifindex and f.src_ip == src and f.tcp_flag_counts)

        for pod in (client, server):
            assert flag_total(pod.host_ifindex, client.ipv4, "syn") == 3, pod.name
            assert flag_total(pod.host_ifindex, server.ipv4, "syn_ack") == 3, pod.name
            assert flag_total(pod.host_ifindex, client.ipv4, "rst") == 0, pod.name
