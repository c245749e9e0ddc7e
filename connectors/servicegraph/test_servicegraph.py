"""The service graph from a known set of flows: edges, counts, metric points, the JSON
map and its dot/mermaid renderings, and the connector inside a running pipeline."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from pydantic import ValidationError

from connectors.servicegraph.config import ServiceGraphConfig
from connectors.servicegraph.connector import ServiceGraphConnector
from connectors.servicegraph.factory import FACTORY
from flowtel import mapformat
from flowtel.component import (
    ComponentConfig,
    CreateSettings,
    Exporter,
    ExporterFactory,
    Kind,
    Receiver,
    ReceiverFactory,
    Telemetry,
)
from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.records import (
    EventKind,
    MetricKind,
    MetricPoint,
    Record,
    TcpFlagCounts,
    TrafficDirection,
    Verdict,
    frozen_extensions,
    replace,
)
from flowtel.registry import factories_by_kind
from flowtel.servicegraph import ServiceGraph, graph_to_dict, source_is_client
from tests.flowsamples import lost, sample_flows


def edges_of(graph: ServiceGraph) -> dict[tuple[str, str, str, str, str], dict[str, object]]:
    out = {}
    for e in graph_to_dict(graph.snapshot())["edges"]:
        key = (e["client"], e["server"], e["protocol"], e["port"], e["verdict"])
        out[key] = {k: e[k] for k in ("flows", "bytes", "packets", "dropped", "dns_latency_seconds",
                                      "tcp_handshake_rtt_seconds")}
    return out


def zero() -> dict[str, float]:
    return {"sum": 0.0, "count": 0}


def test_edges_from_known_flows() -> None:
    graph = ServiceGraph()
    graph.add([*sample_flows().values(), lost()])
    assert edges_of(graph) == {
        # F1 (request) and F2 (the reply) on one edge, client on the left.
        ("shop/frontend", "shop/payments", "TCP", "8080", "FORWARDED"):
            {"flows": 2, "bytes": 1274, "packets": 4, "dropped": 0, "dns_latency_seconds": zero(),
             "tcp_handshake_rtt_seconds": {"sum": 0.001, "count": 1}},
        ("default/client-1", "shop/frontend", "TCP", "80", "DROPPED"):
            {"flows": 1, "bytes": 120, "packets": 2, "dropped": 2, "dns_latency_seconds": zero(),
             "tcp_handshake_rtt_seconds": zero()},
        ("shop/frontend", "kube-system/coredns", "DNS", "53", "FORWARDED"):
            {"flows": 2, "bytes": 0, "packets": 0, "dropped": 0, "dns_latency_seconds": {"sum": 0.002, "count": 1},
             "tcp_handshake_rtt_seconds": zero()},
        ("shop/frontend", "www.example.com", "TCP", "443", "FORWARDED"):
            {"flows": 1, "bytes": 5000, "packets": 10, "dropped": 0, "dns_latency_seconds": zero(),
             "tcp_handshake_rtt_seconds": zero()},
        ("default/client-1", "shop/payments", "ICMPv4", "", "FORWARDED"):
            {"flows": 1, "bytes": 98, "packets": 1, "dropped": 0, "dns_latency_seconds": zero(),
             "tcp_handshake_rtt_seconds": zero()},
        # No is_reply, no SYN: the lower port (5000) is the server's.
        ("fd00::2", "api.internal.test", "UDP", "5000", "FORWARDED"):
            {"flows": 1, "bytes": 400, "packets": 4, "dropped": 0, "dns_latency_seconds": zero(),
             "tcp_handshake_rtt_seconds": zero()},
    }
    nodes = {n["id"]: n["kind"] for n in graph_to_dict(graph.snapshot())["nodes"]}
    assert nodes == {"shop/frontend": "workload", "shop/payments": "workload", "default/client-1": "pod",
                     "kube-system/coredns": "workload", "www.example.com": "dns", "fd00::2": "ip",
                     "api.internal.test": "dns"}


def test_pod_granularity_names_pods() -> None:
    graph = ServiceGraph(granularity="pod")
    graph.add([sample_flows()["F1"]])
    assert list(edges_of(graph)) == [("shop/frontend-7c9d", "shop/payments-0", "TCP", "8080", "FORWARDED")]


def test_a_packet_seen_at_both_veths_of_a_batch_counts_once() -> None:
    sent = replace(sample_flows()["F1"], traffic_direction=TrafficDirection.EGRESS)
    arrived = replace(sent, traffic_direction=TrafficDirection.INGRESS, ifname="veth-pay")
    graph = ServiceGraph()
    graph.add([arrived, sent])
    assert [s.bytes for _, s in graph.snapshot()] == [74]
    # An INGRESS record with no EGRESS twin (a sender on another node) counts.
    graph.add([arrived])
    assert [s.bytes for _, s in graph.snapshot()] == [148]


@pytest.mark.parametrize("change, client_is_src", [
    ({"is_reply": False}, True),
    ({"is_reply": True}, False),
    ({"is_reply": None, "tcp_flag_counts": TcpFlagCounts(syn_ack=1), "src_port": 80, "dst_port": 50000}, False),
    ({"is_reply": None, "tcp_flag_counts": None, "tcp_flags": 0x02, "src_port": 50000, "dst_port": 80}, True),
    ({"is_reply": None, "tcp_flag_counts": None, "tcp_flags": 0x10, "src_port": 80, "dst_port": 50000}, False),
    ({"is_reply": None, "tcp_flag_counts": None, "tcp_flags": 0x10, "src_port": 50000, "dst_port": 80}, True),
])
def test_client_side(change: dict[str, object], client_is_src: bool) -> None:
    assert source_is_client(replace(sample_flows()["F1"], **change)) is client_is_src  # type: ignore[arg-type]


def test_aggregated_connection_records_add_their_rtt_sums() -> None:
    # The kernel aggregates connections (receiver/ebpf/kernel_events): one record of 500
    # client handshakes, its ephemeral port 0, the client side said by is_reply.
    est = replace(sample_flows()["F1"], kind=EventKind.TCP_ESTABLISHED, verdict=Verdict.TRACED, src_port=0,
                  packets=0, bytes=0, tcp_flags=0, tcp_flag_counts=None, traffic_direction=TrafficDirection.UNKNOWN,
                  extensions=frozen_extensions({"connections": 500, "handshake_rtt_ns_sum": 50_000_000,
                                                "handshake_rtt_count": 500}))
    graph = ServiceGraph()
    graph.add([est])
    (edge,) = graph_to_dict(graph.snapshot())["edges"]
    assert (edge["client"], edge["server"], edge["port"]) == ("shop/frontend", "shop/payments", "8080")
    assert edge["tcp_handshake_rtt_seconds"] == {"sum": pytest.approx(0.05), "count": 500}


def test_icmp_echo_reply_has_the_server_as_source() -> None:
    reply = replace(sample_flows()["F7"], src_port=0, src_ip="10.0.0.2", dst_ip="10.0.1.1")
    assert source_is_client(reply) is False


def test_expiry_and_edge_limit() -> None:
    graph = ServiceGraph(expire_after=60, max_edges=2)
    flows = sample_flows()
    graph.add([flows["F1"], flows["F3"], flows["F6"]])
    assert len(graph) == 2 and graph.overflow == 1
    assert graph.expire(time.monotonic() + 30) == 0
    assert graph.expire(time.monotonic() + 61) == 2
    assert len(graph) == 0


class Capture:
    def __init__(self) -> None:
        self.got: list[MetricPoint] = []

    def wants(self, signal: str) -> bool:
        return signal == "metrics"

    def consume(self, batch: list[Record]) -> None:
        self.got.extend(batch)  # type: ignore[arg-type]


def test_connector_emits_documented_metric_points() -> None:
    capture = Capture()
    conn = FACTORY.create(CreateSettings("servicegraph", "node-1", Telemetry()),
                          ServiceGraphConfig(metrics_flush_interval=0), capture)
    assert isinstance(conn, ServiceGraphConnector)
    conn.consume(list(sample_flows().values()))
    by = {(p.name, p.attributes["client"], p.attributes["server"], p.attributes["protocol"]): p for p in capture.got}
    base = "flowtel_service_graph_"
    fp = by[(base + "request_total", "frontend", "payments", "TCP")]
    assert fp.attributes == {"client": "frontend", "server": "payments", "client_namespace": "shop",
                             "server_namespace": "shop", "protocol": "TCP", "port": "8080", "verdict": "FORWARDED"}
    assert (fp.value, fp.kind) == (2, MetricKind.SUM)
    assert by[(base + "bytes_total", "frontend", "payments", "TCP")].value == 1274
    assert by[(base + "bytes_total", "frontend", "payments", "TCP")].unit == "By"
    assert by[(base + "tcp_handshake_rtt_seconds_sum", "frontend", "payments", "TCP")].value == pytest.approx(0.001)
    assert by[(base + "tcp_handshake_rtt_seconds_count", "frontend", "payments", "TCP")].value == 1
    assert by[(base + "dropped_total", "client-1", "frontend", "TCP")].value == 2
    assert by[(base + "dns_latency_seconds_sum", "frontend", "coredns", "DNS")].value == pytest.approx(0.002)
    assert by[(base + "dns_latency_seconds_count", "frontend", "coredns", "DNS")].value == 1
    # Series only where there is data: no drop series on forwarded edges, no DNS on TCP.
    assert (base + "dropped_total", "frontend", "payments", "TCP") not in by
    assert (base + "dns_latency_seconds_sum", "frontend", "payments", "TCP") not in by
    assert {p.name.removeprefix(base) for p in capture.got} == {
        "request_total", "bytes_total", "dropped_total", "dns_latency_seconds_sum", "dns_latency_seconds_count",
        "tcp_handshake_rtt_seconds_sum", "tcp_handshake_rtt_seconds_count"}
    # Cumulative: a second batch adds to the same series.
    capture.got.clear()
    conn.consume([sample_flows()["F1"]])
    again = {(p.name, p.attributes["client"], p.attributes["server"]): p.value for p in capture.got}
    assert again[(base + "request_total", "frontend", "payments")] == 3


def test_flush_interval_batches_emissions_and_shutdown_flushes() -> None:
    capture = Capture()
    conn = ServiceGraphConnector(CreateSettings("servicegraph", "n", Telemetry()),
                                 ServiceGraphConfig(metrics_flush_interval=3600), capture)
    conn.start()
    conn.consume([sample_flows()["F1"]])
    conn.consume([sample_flows()["F1"]])
    assert capture.got == []  # emitted by the timer, not per batch
    conn.shutdown()
    assert [p.value for p in capture.got if p.name.endswith("request_total")] == [2]


class TimedCapture(Capture):
    """Each emission with the monotonic time it arrived (the connector's timer thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.emissions: list[tuple[float, dict[tuple[str, str], float]]] = []
        self.lock = threading.Lock()

    def consume(self, batch: list[Record]) -> None:
        requests = {(p.attributes["client"], p.attributes["server"]): p.value
                    for p in batch if isinstance(p, MetricPoint) and p.name.endswith("request_total")}
        with self.lock:
            self.emissions.append((time.monotonic(), requests))

    def of(self, edge: tuple[str, str]) -> list[tuple[float, float]]:
        with self.lock:
            return [(t, r[edge]) for t, r in self.emissions if edge in r]


def test_idle_edge_is_re_exported_every_interval_then_expires() -> None:
    capture, tel = TimedCapture(), Telemetry()
    interval, expire_after = 0.1, 0.8
    conn = ServiceGraphConnector(CreateSettings("servicegraph", "n", tel),
                                 ServiceGraphConfig(metrics_flush_interval=interval, expire_after=expire_after), capture)
    idle, busy = ("frontend", "payments"), ("client-1", "frontend")
    conn.start()
    try:
        counted = time.monotonic()
        conn.consume([sample_flows()["F1"]])  # the idle edge: one flow, then nothing
        deadline = counted + expire_after + 1.0
        while time.monotonic() < deadline:
            conn.consume([sample_flows()["F3"]])  # another edge keeps getting flows
            time.sleep(interval / 2)
        idle_emissions = capture.of(idle)
        busy_emissions = capture.of(busy)
    finally:
        conn.shutdown()
    # Re-exported with its unchanged cumulative value on every tick while idle …
    assert [v for _, v in idle_emissions] == [1] * len(idle_emissions)
    assert len(idle_emissions) >= expire_after / interval * 0.6
    gaps = [b - a for (a, _), (b, _) in zip(idle_emissions, idle_emissions[1:])]
    assert max(gaps) < interval * 3
    # … until it had no flows for expire_after: then it is forgotten, no longer emitted.
    last = idle_emissions[-1][0] - counted
    assert expire_after - interval <= last <= expire_after + interval * 3
    assert tel.get("servicegraph", "edges_expired") == 1
    assert idle not in {(k.client.name, k.server.name) for k, _ in conn.graph.snapshot()}
    # The edge with traffic stays, and its count grows.
    assert busy_emissions[-1][0] > idle_emissions[-1][0] + interval
    assert busy_emissions[-1][1] > busy_emissions[0][1]


def test_config() -> None:
    cfg = ServiceGraphConfig.model_validate({"metrics_flush_interval": "30s", "expire_after": "5m"})
    assert (cfg.metrics_flush_interval, cfg.expire_after, cfg.granularity) == (30.0, 300.0, "workload")
    with pytest.raises(ValidationError):
        ServiceGraphConfig.model_validate({"granularity": "namespace"})
    assert FACTORY.kind is Kind.CONNECTOR and FACTORY.type == "servicegraph"


# --- renderings of the map -----------------------------------------------------------------


def sample_map() -> dict[str, object]:
    graph = ServiceGraph()
    graph.add(list(sample_flows().values()))
    return graph_to_dict(graph.snapshot())


def test_dot_rendering() -> None:
    dot = mapformat.to_dot(sample_map())
    assert dot.startswith("digraph flowtel {\n  rankdir=LR;")
    assert '  "shop/frontend" [label="frontend\\nshop", tooltip="workload"];' in dot
    assert ('  "shop/frontend" -> "shop/payments" [label="TCP/8080 FORWARDED: 2 flows, 1.3 kB, rtt 1.00 ms"];'
            in dot)
    assert ('  "default/client-1" -> "shop/frontend" [label="TCP/80 DROPPED: 1 flows, 120 B, 2 dropped", '
            "color=red, fontcolor=red, style=dashed];") in dot
    assert '"shop/frontend" -> "kube-system/coredns" [label="DNS/53 FORWARDED: 2 flows, dns 2.0 ms"];' in dot
    assert dot.rstrip().endswith("}")


def test_mermaid_rendering() -> None:
    text = mapformat.to_mermaid(sample_map())
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    ids = {line.split("[", 1)[1]: line.split("[", 1)[0].strip() for line in lines if '["' in line}
    front, pay, client = ids['"frontend<br/>shop"]'], ids['"payments<br/>shop"]'], ids['"client-1<br/>default"]']
    assert f'  {front} -->|"TCP/8080 FORWARDED: 2 flows, 1.3 kB, rtt 1.00 ms"| {pay}' in lines
    dropped = f'  {client} -.->|"TCP/80 DROPPED: 1 flows, 120 B, 2 dropped"| {front}'
    assert dropped in lines
    edge_lines = [line for line in lines if "-->" in line or "-.->" in line]
    assert lines[-1] == f"  linkStyle {edge_lines.index(dropped)} stroke:red,color:red"


def test_mermaid_escapes_quotes() -> None:
    graph = {"nodes": [{"id": 'a"b', "name": 'a"b', "namespace": "", "kind": "dns"}], "edges": []}
    assert 'n0["a#quot;b"]' in mapformat.to_mermaid(graph)


# --- inside a running pipeline --------------------------------------------------------------


class _Cfg(ComponentConfig):
    pass


class _Replay(Receiver):
    def start(self) -> None:
        self.next_consumer.consume(list(sample_flows().values()))


class _Points(Exporter):
    got: list[MetricPoint] = []

    def consume(self, batch: list[Record]) -> None:
        _Points.got.extend(batch)  # type: ignore[arg-type]


def test_connector_in_a_service_turns_flows_into_metrics() -> None:
    factories = factories_by_kind()
    factories[Kind.RECEIVER]["replay"] = ReceiverFactory("replay", _Cfg, lambda s, c, n: _Replay(s, n),
                                                 ("logs",))
    factories[Kind.EXPORTER]["points"] = ExporterFactory("points", _Cfg, lambda s, c: _Points(s), signals=("metrics",))
    config = parse_config({
        "receivers": {"replay": {}},
        "connectors": {"servicegraph": {"metrics_flush_interval": "1h"}},
        "exporters": {"points": {}},
        "service": {"pipelines": {
            "logs": {"receivers": ["replay"], "exporters": ["servicegraph"]},
            "metrics": {"receivers": ["servicegraph"], "exporters": ["points"]},
        }},
    }, "test", factories=factories)
    _Points.got = []
    service = Service(config, node_name="node-1", factories=factories)
    service.start()
    service.shutdown()
    requests = {(p.attributes["client"], p.attributes["server"]): p.value
                for p in _Points.got if p.name == "flowtel_service_graph_request_total"}
    assert requests[("frontend", "payments")] == 2 and requests[("frontend", "coredns")] == 2


def test_a_dns_response_seen_twice_keeps_the_clients_latency() -> None:
    at_server = replace(sample_flows()["F5"], traffic_direction=TrafficDirection.EGRESS,
                                    latency_ns=300_000)
    at_client = replace(sample_flows()["F5"], traffic_direction=TrafficDirection.INGRESS,
                                    latency_ns=2_000_000)
    graph = ServiceGraph()
    graph.add([at_server, at_client])
    [(_, stats)] = graph.snapshot()
    assert (stats.flows, stats.dns_latency_ns_sum, stats.dns_latency_count) == (1, 2_000_000, 1)


def test_a_batch_counts_as_its_records_one_by_one() -> None:
    # ServiceGraph.add groups a batch by edge and updates each edge once with its group's
    # sums; that must equal counting every record on its own with _count, over records of
    # every kind (packets, drops with and without counts, DNS latencies, RTT sums and single
    # RTTs, times out of order) spread over shared and distinct edges.
    from flowtel.servicegraph import EdgeStats, _count, _edge_parts, countable, node_of

    samples = list(sample_flows().values())
    rtt_sum = frozen_extensions({"handshake_rtt_ns_sum": 9_000, "handshake_rtt_count": 3})
    rtt_one = frozen_extensions({"handshake_rtt_ns": 700})
    batch: list[Record] = []
    for i in range(400):
        flow = samples[i % len(samples)]
        if not hasattr(flow, "src_ip"):
            continue
        change: dict[str, object] = {"time_ns": flow.time_ns + (i * 7919) % 5000 - 2500}
        if i % 3 == 0:
            change["packets"], change["bytes"] = i, i * 100
        if i % 5 == 0 and flow.kind is EventKind.PACKET:
            change["verdict"] = Verdict.DROPPED
        if i % 11 == 0 and not flow.extensions:
            change["extensions"] = rtt_sum if i % 2 else rtt_one
        batch.append(replace(flow, **change))
    graph = ServiceGraph(expire_after=0)
    graph.add(batch)
    graph.add(batch[:57])  # a second batch into existing edges
    expected: dict[tuple[object, ...], EdgeStats] = {}
    for flow in countable(batch) + countable(batch[:57]):
        key = _edge_parts(flow, "workload", node_of)
        stats = expected.get(key)
        if stats is None:
            stats = expected[key] = EdgeStats(first_seen_ns=flow.time_ns)
        _count(stats, flow)
    got = {(k.client, k.server, k.protocol, k.port, k.verdict): s for k, s in graph.snapshot()}
    assert len(expected) > 5 and set(got) == set(expected)
    totals = expected.values()
    assert max(s.flows for s in totals) > 20  # groups, not one record per edge
    assert all(sum(getattr(s, f) for s in totals) for f in ("dropped", "dns_latency_count", "handshake_rtt_count"))
    for key, stats in expected.items():
        stats.touched = got[key].touched
        assert got[key] == stats, key
