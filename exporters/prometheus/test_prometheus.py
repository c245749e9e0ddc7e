"""The prometheus exporter: the exposition text (names exact, types right), and a real
Prometheus server scraping it, queried with the PromQL the ACNS dashboards use."""
from __future__ import annotations

import gzip
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from pydantic import ValidationError

from flowtel.lib.metrics.series import FamilySnapshot
from exporters.prometheus.config import PrometheusConfig
from exporters.prometheus.exporter import PrometheusExporter
from flowtel.lib.metrics.exposition import render
from exporters.prometheus.factory import FACTORY
from flowtel.component import Kind, Telemetry
from flowtel.errors import StartError
from flowtel.records import MetricKind, MetricPoint
from tests.support.exporting import point, settings
from tests.support.prometheus_server import PrometheusServer


def gauge(name: str, value: float, **attributes: str) -> MetricPoint:
    return point(name, value, MetricKind.GAUGE, **attributes)


def test_exposition_keeps_names_exact_and_types_right() -> None:
    families = [
        FamilySnapshot("networkobservability_drop_count", MetricKind.SUM, "", "Dropped packets",
                       [({"reason": "NO_SOCKET", "direction": "ingress"}, 3.0, 1)]),
        FamilySnapshot("hubble_dns_responses_total", MetricKind.SUM, "", "",
                       [({"rcode": "Non-Existent Domain", "qtypes": "A", "source": 'odd"ns\\x/pod\nname'}, 2, 1)]),
        FamilySnapshot("networkobservability_tcp_state", MetricKind.GAUGE, "", "TCP sockets\nby state",
                       [({"state": "ESTABLISHED"}, 4.5, 0), ({"k8s.pod.name": "a", "k8s_pod_name": "b"}, 1e21, 0)]),
        FamilySnapshot("flowtel.dns-latency", MetricKind.GAUGE, "", "", []),
    ]
    telemetry = {("otlp", "records_in"): 10, ("pipeline/logs", "records_in"): 4, ("otlp", "send_queue_size"): 2}
    text = render(families, telemetry, frozenset({("otlp", "records_in"), ("pipeline/logs", "records_in")}))
    assert text == (
        "# HELP hubble_dns_responses_total hubble_dns_responses_total\n"
        "# TYPE hubble_dns_responses_total counter\n"
        'hubble_dns_responses_total{qtypes="A",rcode="Non-Existent Domain",source="odd\\"ns\\\\x/pod\\nname"} 2\n'
        "# HELP networkobservability_drop_count Dropped packets\n"
        "# TYPE networkobservability_drop_count counter\n"
        'networkobservability_drop_count{direction="ingress",reason="NO_SOCKET"} 3\n'
        "# HELP networkobservability_tcp_state TCP sockets\\nby state\n"
        "# TYPE networkobservability_tcp_state gauge\n"
        'networkobservability_tcp_state{state="ESTABLISHED"} 4.5\n'
        'networkobservability_tcp_state{k8s_pod_name="a;b"} 1e+21\n'
        "# HELP flowtel_component_records_in flowtel self-telemetry: records_in per component\n"
        "# TYPE flowtel_component_records_in counter\n"
        'flowtel_component_records_in{component="otlp"} 10\n'
        'flowtel_component_records_in{component="pipeline/logs"} 4\n'
        "# HELP flowtel_component_send_queue_size flowtel self-telemetry: send_queue_size per component\n"
        "# TYPE flowtel_component_send_queue_size gauge\n"
        'flowtel_component_send_queue_size{component="otlp"} 2\n'
    )


@pytest.fixture
def exporter() -> Iterator[PrometheusExporter]:
    exp = PrometheusExporter(settings("prometheus"), PrometheusConfig(endpoint="127.0.0.1:0", series_ttl=1.5))
    exp.start()
    yield exp
    exp.shutdown()


def scrape(exp: PrometheusExporter, path: str = "/metrics", gzipped: bool = False) -> tuple[str, dict[str, str]]:
    host, port = exp.address
    request = urllib.request.Request(f"http://{host}:{port}{path}",
                                     headers={"Accept-Encoding": "gzip"} if gzipped else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
        headers = dict(response.headers)
    return (gzip.decompress(body) if gzipped else body).decode(), headers


def test_serves_the_latest_values_and_forgets_idle_series(exporter: PrometheusExporter) -> None:
    exporter.consume([point("networkobservability_drop_count", 1, reason="NO_SOCKET", direction="egress"),
                      point("hubble_drop_total", 1, source="shop/gone", reason="POLICY_DENIED", protocol="TCP")])
    exporter.consume([point("networkobservability_drop_count", 6, reason="NO_SOCKET", direction="egress")])
    text, headers = scrape(exporter)
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'networkobservability_drop_count{direction="egress",reason="NO_SOCKET"} 6\n' in text
    assert 'hubble_drop_total{protocol="TCP",reason="POLICY_DENIED",source="shop/gone"} 1\n' in text
    assert 'flowtel_component_records_in{component="prometheus"} 3\n' in text
    time.sleep(1.6)
    exporter.consume([point("networkobservability_drop_count", 7, reason="NO_SOCKET", direction="egress")])
    text, _ = scrape(exporter, gzipped=True)
    assert "hubble_drop_total" not in text
    assert 'networkobservability_drop_count{direction="egress",reason="NO_SOCKET"} 7\n' in text
    assert 'flowtel_component_series_expired{component="prometheus"} 1\n' in text
    with pytest.raises(urllib.error.HTTPError, match="404"):
        scrape(exporter, "/")


def test_refuses_flow_logs(exporter: PrometheusExporter) -> None:
    with pytest.raises(TypeError, match="metric points only"):
        exporter.consume([object()])  # type: ignore[list-item]


def test_a_port_in_use_is_a_start_error_with_a_remedy(exporter: PrometheusExporter) -> None:
    host, port = exporter.address
    second = PrometheusExporter(settings("prometheus"), PrometheusConfig(endpoint=f"{host}:{port}"))
    with pytest.raises(StartError, match="Address already in use") as info:
        second.start()
    assert "choose another port" in str(info.value)


def test_a_real_prometheus_scrapes_acns_and_hubble_families(tmp_path: Path) -> None:
    telemetry = Telemetry()
    exp = PrometheusExporter(settings("prometheus", telemetry),
                             PrometheusConfig(endpoint="127.0.0.1:0", series_ttl=2.0))
    exp.start()
    host, port = exp.address
    prometheus = PrometheusServer(tmp_path, [f"{host}:{port}"])
    try:
        def feed(drops_ingress: int) -> None:
            exp.consume([
                point("networkobservability_drop_count", drops_ingress, reason="IPTABLE_RULE_DROP", direction="ingress"),
                point("networkobservability_drop_count", 2, reason="IPTABLE_RULE_DROP", direction="egress"),
                point("networkobservability_drop_count", 3, reason="NO_SOCKET", direction="egress"),
                point("networkobservability_forward_bytes", 1000, direction="ingress"),
                point("networkobservability_forward_bytes", 250, direction="egress"),
                gauge("networkobservability_tcp_state", 4, state="ESTABLISHED"),
                point("hubble_dns_responses_total", 5, source="shop/frontend-7c9d", destination="kube-system/coredns-1",
                      rcode="No Error", qtypes="A", ips_returned="1"),
                point("hubble_dns_responses_total", 2, source="shop/frontend-7c9d", destination="kube-system/coredns-1",
                      rcode="Non-Existent Domain", qtypes="A", ips_returned="0"),
                point("hubble_dns_responses_total", 1, source="shop/payments-0", destination="kube-system/coredns-1",
                      rcode="Non-Existent Domain", qtypes="AAAA", ips_returned="0"),
                point("hubble_tcp_flags_total", 6, flag="RST", family="IPv4", source_workload="frontend"),
                point("hubble_tcp_flags_total", 1, flag="RST", family="IPv4", source_workload="payments"),
                point("hubble_tcp_flags_total", 9, flag="SYN", family="IPv4", source_workload="frontend"),
            ])

        # Like a receiver, send the current state every interval, from a thread of its own.
        state = {"drops_ingress": 5, "deleted_pod_alive": True}
        stop = threading.Event()

        def receiver() -> None:
            while not stop.is_set():
                feed(state["drops_ingress"])
                if state["deleted_pod_alive"]:
                    exp.consume([point("hubble_drop_total", 1, source="shop/deleted-pod", reason="POLICY_DENIED",
                                       protocol="TCP")])
                stop.wait(0.3)

        feeder = threading.Thread(target=receiver, daemon=True)
        feeder.start()
        prometheus.wait_ready()

        def q(promql: str, expected: dict[tuple[tuple[str, str], ...], float]) -> None:
            assert prometheus.wait_query(promql, expected) == expected, promql

        q("sum by (reason) (networkobservability_drop_count)",
          {(("reason", "IPTABLE_RULE_DROP"),): 7, (("reason", "NO_SOCKET"),): 3})
        q("sum by (direction) (networkobservability_forward_bytes)",
          {(("direction", "ingress"),): 1000, (("direction", "egress"),): 250})
        q('sum by (source, rcode) (hubble_dns_responses_total)', {
            (("rcode", "No Error"), ("source", "shop/frontend-7c9d")): 5,
            (("rcode", "Non-Existent Domain"), ("source", "shop/frontend-7c9d")): 2,
            (("rcode", "Non-Existent Domain"), ("source", "shop/payments-0")): 1,
        })
        q('sum by (source_workload) (hubble_tcp_flags_total{flag="RST"})',
          {(("source_workload", "frontend"),): 6, (("source_workload", "payments"),): 1})
        q("networkobservability_tcp_state", {(("__name__", "networkobservability_tcp_state"),
                                               ("state", "ESTABLISHED")): 4})
        (records_in,) = prometheus.query('flowtel_component_records_in{component="prometheus"}').values()
        assert 13 <= records_in <= telemetry.get("prometheus", "records_in")

        # Types reach Prometheus as declared, and no name gained a suffix.
        metadata = prometheus.api("metadata")
        assert metadata["networkobservability_drop_count"][0]["type"] == "counter"
        assert metadata["hubble_dns_responses_total"][0]["type"] == "counter"
        assert metadata["networkobservability_tcp_state"][0]["type"] == "gauge"
        assert not any(name.endswith("_total_total") or name == "networkobservability_drop_count_total"
                       for name in metadata)

        # A counter that moves is seen moving; a deleted pod's series goes stale and disappears.
        q('hubble_drop_total', {(("__name__", "hubble_drop_total"), ("protocol", "TCP"),
                                 ("reason", "POLICY_DENIED"), ("source", "shop/deleted-pod")): 1})
        state["drops_ingress"] = 11
        state["deleted_pod_alive"] = False
        q('networkobservability_drop_count{reason="IPTABLE_RULE_DROP", direction="ingress"}', {
            (("__name__", "networkobservability_drop_count"), ("direction", "ingress"),
             ("reason", "IPTABLE_RULE_DROP")): 11})
        assert prometheus.wait_query("hubble_drop_total", {}, timeout=10) == {}
        q("count(networkobservability_drop_count)", {(): 3})
        assert telemetry.get("prometheus", "series_expired") == 1
    finally:
        stop.set()
        prometheus.stop()
        exp.shutdown()


def test_config_and_factory() -> None:
    assert PrometheusConfig().endpoint == "0.0.0.0:9965"
    assert PrometheusConfig(endpoint="[::1]:9965").endpoint == "[::1]:9965"
    with pytest.raises(ValidationError, match="expected host:port"):
        PrometheusConfig(endpoint="9965")
    assert (FACTORY.type, FACTORY.kind, tuple(FACTORY.signals)) == ("prometheus", Kind.EXPORTER, ("metrics",))
