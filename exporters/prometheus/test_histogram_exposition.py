"""Histograms on /metrics: ``_bucket{le}`` (cumulative, ``+Inf`` last), ``_sum``, ``_count``
under the name as given, and a real Prometheus computing ``histogram_quantile`` from them."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flowtel.lib.metrics.series import FamilySnapshot, HistogramValue
from exporters.prometheus.config import PrometheusConfig
from exporters.prometheus.exporter import PrometheusExporter
from flowtel.lib.metrics.exposition import render
from flowtel.histogram import DNS_LATENCY_BOUNDS, Histogram
from flowtel.records import MetricKind
from tests.support.exporting import settings
from tests.support.prometheus_server import PrometheusServer


def test_histogram_exposition_text() -> None:
    families = [
        FamilySnapshot("flowtel_tcp_handshake_rtt_seconds", MetricKind.HISTOGRAM, "s", "Client-side RTTs", [
            ({}, HistogramValue((0.0001, 0.5, 1.0), (1, 2, 0, 3), 7.25, 6), 1),
            ({"k8s.node.name": "n\"1"}, HistogramValue((0.0001, 0.5, 1.0), (0, 0, 0, 0), 0.0, 0), 1),
        ]),
        FamilySnapshot("flowtel_dns_latency_seconds", MetricKind.HISTOGRAM, "s", "", []),  # no points: no family
    ]
    assert render(families) == (
        "# HELP flowtel_tcp_handshake_rtt_seconds Client-side RTTs\n"
        "# TYPE flowtel_tcp_handshake_rtt_seconds histogram\n"
        'flowtel_tcp_handshake_rtt_seconds_bucket{le="0.0001"} 1\n'
        'flowtel_tcp_handshake_rtt_seconds_bucket{le="0.5"} 3\n'
        'flowtel_tcp_handshake_rtt_seconds_bucket{le="1"} 3\n'
        'flowtel_tcp_handshake_rtt_seconds_bucket{le="+Inf"} 6\n'
        "flowtel_tcp_handshake_rtt_seconds_sum 7.25\n"
        "flowtel_tcp_handshake_rtt_seconds_count 6\n"
        'flowtel_tcp_handshake_rtt_seconds_bucket{k8s_node_name="n\\"1",le="0.0001"} 0\n'
        'flowtel_tcp_handshake_rtt_seconds_bucket{k8s_node_name="n\\"1",le="0.5"} 0\n'
        'flowtel_tcp_handshake_rtt_seconds_bucket{k8s_node_name="n\\"1",le="1"} 0\n'
        'flowtel_tcp_handshake_rtt_seconds_bucket{k8s_node_name="n\\"1",le="+Inf"} 0\n'
        'flowtel_tcp_handshake_rtt_seconds_sum{k8s_node_name="n\\"1"} 0\n'
        'flowtel_tcp_handshake_rtt_seconds_count{k8s_node_name="n\\"1"} 0\n'
    )


def test_a_real_prometheus_computes_histogram_quantile(tmp_path: Path) -> None:
    exp = PrometheusExporter(settings("prometheus"), PrometheusConfig(endpoint="127.0.0.1:0"))
    exp.start()
    host, port = exp.address
    prometheus = PrometheusServer(tmp_path, [f"{host}:{port}"])
    latency = Histogram(DNS_LATENCY_BOUNDS)
    for _ in range(10):
        latency.observe(2**-8)  # 0.00390625: (0.0025, 0.005]
    for _ in range(10):
        latency.observe(2**-5)  # 0.03125: (0.025, 0.05]; both exact in binary, so is the sum
    stop = threading.Event()

    def receiver() -> None:
        while not stop.is_set():
            exp.consume([latency.point("flowtel_dns_latency_seconds", 1, unit="s", description="DNS latency")])
            stop.wait(0.3)

    feeder = threading.Thread(target=receiver, daemon=True)
    try:
        feeder.start()
        prometheus.wait_ready()

        def q(promql: str, expected: dict[tuple[tuple[str, str], ...], float]) -> None:
            assert prometheus.wait_query(promql, expected) == expected, promql

        q("flowtel_dns_latency_seconds_count", {(("__name__", "flowtel_dns_latency_seconds_count"),): 20})
        q("flowtel_dns_latency_seconds_sum", {(("__name__", "flowtel_dns_latency_seconds_sum"),): 0.3515625})
        q('flowtel_dns_latency_seconds_bucket{le="+Inf"}',
          {(("__name__", "flowtel_dns_latency_seconds_bucket"), ("le", "+Inf")): 20})
        # Rank 5 of 20 is halfway into (0.0025, 0.005]; rank 15 halfway into (0.025, 0.05].
        (p25,) = prometheus.query("histogram_quantile(0.25, sum by (le) (flowtel_dns_latency_seconds_bucket))").values()
        (p75,) = prometheus.query("histogram_quantile(0.75, sum by (le) (flowtel_dns_latency_seconds_bucket))").values()
        assert (p25, p75) == (pytest.approx(0.00375), pytest.approx(0.0375))
        assert prometheus.api("metadata")["flowtel_dns_latency_seconds"][0]["type"] == "histogram"
    finally:
        stop.set()
        prometheus.stop()
        exp.shutdown()
