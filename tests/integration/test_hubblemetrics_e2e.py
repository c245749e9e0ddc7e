"""hubblemetrics and the node forward counters on the real kernel: an in-process agent (ebpf
receiver → hubblemetrics connector → memory exporter) while testbed pods make TCP connections.

The truth: the connections the test makes (one SYN and one SYN-ACK each, seen at both pods'
veths, as Hubble sees a same-node connection at from-endpoint and to-endpoint) and the kernel's
own `ip -s link` counters of the host-side veths (the testbed is quiet, so their deltas are
exactly the test's frames)."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from flowtel.component import ComponentConfig, CreateSettings, Exporter, ExporterFactory, Kind
from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.records import MetricPoint, Record
from flowtel.registry import factories_by_kind
from testbed import Pod, Testbed, send_tcp

pytestmark = pytest.mark.kernel

CONNECTIONS = 3


class _MemoryConfig(ComponentConfig):
    pass


class MemoryExporter(Exporter):
    def __init__(self, settings: CreateSettings, config: _MemoryConfig) -> None:
        super().__init__(settings)
        self.points: list[MetricPoint] = []
        self._lock = threading.Lock()

    def consume(self, batch: list[Record]) -> None:
        with self._lock:
            self.points.extend(p for p in batch if isinstance(p, MetricPoint))

    def last(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Each series' latest cumulative value."""
        with self._lock:
            return {tuple(p.attributes.items()): p.value for p in self.points if p.name == name}


def start_agent(glob: str) -> Service:
    factories = factories_by_kind()
    factories[Kind.EXPORTER] = {**factories[Kind.EXPORTER],
                                "memory": ExporterFactory("memory", _MemoryConfig, MemoryExporter)}
    context = "sourceContext=ip;destinationContext=ip"
    cfg = parse_config({
        "receivers": {"ebpf": {"interfaces": [glob], "collection_interval": "500ms"}},
        "connectors": {"hubblemetrics": {"interval": "500ms", "metrics": [
            f"flow:{context}", f"tcp:labelsContext=traffic_direction;{context}"]}},
        "exporters": {"memory": {}},
        "service": {"pipelines": {
            "logs": {"receivers": ["ebpf"], "exporters": ["hubblemetrics"]},
            "metrics": {"receivers": ["ebpf", "hubblemetrics"], "exporters": ["memory"]},
        }},
    }, "test_hubblemetrics_e2e", factories=factories, environ={})
    service = Service(cfg, node_name="test-node", factories=factories)
    service.start()
    return service


def wait_attached(service: Service, pods: list[Pod]) -> None:
    receiver: Any = service.receivers["ebpf"]
    deadline = time.monotonic() + 90  # start-up took > 30 s at load 12
    while not {p.host_ifindex for p in pods} <= set(receiver.attach_manager.attached()):
        assert time.monotonic() < deadline, "tc programs were not attached to the pods' veths"
        time.sleep(0.05)


def test_flow_tcp_and_forward_metrics_match_the_traffic(bed: Testbed) -> None:
    client, server = bed.add_pod("client"), bed.add_pod("server")
    pods = [client, server]
    service = start_agent(bed.interface_glob)
    try:
        wait_attached(service, pods)
        sink = bed.start_tcp_sink(server, 8080)
        time.sleep(0.3)  # the sink listens; nothing crosses the veths for that
        before = {p.name: bed.link_stats(p) for p in pods}
        for _ in range(CONNECTIONS):
            send_tcp(client, server.ipv4, 8080, 50_000)
        assert len(sink.wait_records(CONNECTIONS)) == CONNECTIONS
        delta = {p.name: bed.link_stats(p) - before[p.name] for p in pods}
    finally:
        service.shutdown()  # final drain and final flush: the last values are the totals
    memory: Any = service.exporters["memory"]
    rx = sum(d.rx_packets for d in delta.values())  # host veth received = pods sent
    tx = sum(d.tx_packets for d in delta.values())
    assert rx > 4 * CONNECTIONS and tx == rx, delta  # sanity: the veths saw the connections

    forward = memory.last("networkobservability_forward_count")
    forward_bytes = memory.last("networkobservability_forward_bytes")
    assert forward == {(("direction", "ingress"),): rx, (("direction", "egress"),): tx}
    assert forward_bytes == {(("direction", "ingress"),): sum(d.rx_bytes for d in delta.values()),
                             (("direction", "egress"),): sum(d.tx_bytes for d in delta.values())}

    ips = {client.ipv4, server.ipv4}
    processed: dict[str, float] = {}
    for labels, value in memory.last("hubble_flows_processed_total").items():
        lab = dict(labels)
        assert list(lab) == ["source", "destination", "protocol", "type", "subtype", "verdict"]
        if {lab["source"], lab["destination"]} == ips:
            assert (lab["protocol"], lab["type"], lab["verdict"]) == ("TCP", "Trace", "FORWARDED")
            processed[lab["subtype"]] = processed.get(lab["subtype"], 0) + value
    # One Hubble flow event per packet per observation point.
    assert processed == {"from-endpoint": rx, "to-endpoint": tx}

    flags: dict[tuple[str, str, str, str], float] = {}
    for labels, value in memory.last("hubble_tcp_flags_total").items():
        lab = dict(labels)
        assert list(lab) == ["traffic_direction", "source", "destination", "flag", "family"]
        if {lab["source"], lab["destination"]} == ips:
            flags[(lab["source"], lab["traffic_direction"], lab["flag"], lab["family"])] = value
    c, s = client.ipv4, server.ipv4
    assert {k: v for k, v in flags.items() if k[2] in ("SYN", "SYN-ACK")} == {
        (c, "egress", "SYN", "IPv4"): CONNECTIONS,   # at the client's veth, leaving the client
        (c, "ingress", "SYN", "IPv4"): CONNECTIONS,  # at the server's veth, entering the server
        (s, "egress", "SYN-ACK", "IPv4"): CONNECTIONS,
        (s, "ingress", "SYN-ACK", "IPv4"): CONNECTIONS,
    }
    # Each side closes once: one FIN per connection per side, seen at both veths.
    assert flags[(c, "egress", "FIN", "IPv4")] == CONNECTIONS
    assert flags[(s, "ingress", "FIN", "IPv4")] == CONNECTIONS
