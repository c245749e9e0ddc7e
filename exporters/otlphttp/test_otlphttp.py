"""The otlphttp exporter against a real OTLP/HTTP server: protobuf bodies, gzip, headers,
HTTPS, HTTP status rules, and the sending queue through backend outages."""
from __future__ import annotations

from tests.support.wire import any_uuid, any_uuid_envelope

import ssl
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydantic import ValidationError

from exporters.otlphttp.config import OtlpHttpConfig
from exporters.otlphttp.exporter import OtlpHttpExporter
from exporters.otlphttp.factory import FACTORY
from flowtel.lib.hubble import convert as hubble, printer, summary as _summary, timefmt
from flowtel.component import Kind, Telemetry
from flowtel.errors import StartError
from flowtel.records import MetricKind, MetricPoint
from tests.support.certs import Pki, make_pki
from tests.support.exporting import NODE, T0, point, pod_flow, settings, wait_until
from tests.support.otlp_receiver import Fault, HttpOtlpServer, any_to_python

FAST_RETRY = {"initial_interval": "50ms", "max_interval": "100ms", "max_elapsed_time": "20s",
              "randomization_factor": 0}


@pytest.fixture
def server() -> Iterator[HttpOtlpServer]:
    srv = HttpOtlpServer().start()
    yield srv
    srv.stop()


def make(endpoint: str, telemetry: Telemetry | None = None, **cfg: Any) -> OtlpHttpExporter:
    data: dict[str, Any] = {"endpoint": endpoint, "export_interval": "1h", "retry_on_failure": FAST_RETRY,
                            "timeout": "2s"}
    data.update(cfg)
    exporter = OtlpHttpExporter(settings("otlphttp", telemetry), OtlpHttpConfig.model_validate(data))
    exporter.start()
    return exporter


def test_metrics_and_logs_arrive_on_their_paths_gzipped_with_headers(server: HttpOtlpServer) -> None:
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry, headers={"Authorization": "Bearer s3cret"})
    try:
        exporter.consume([point("networkobservability_drop_bytes", 1500, reason="NO_SOCKET", direction="ingress"),
                          MetricPoint("networkobservability_tcp_state", 2, MetricKind.GAUGE, time.time_ns(),
                                      {"state": "TIME_WAIT"})])
        exporter.consume([pod_flow(), pod_flow(1)])
        exporter.flush()
    finally:
        exporter.shutdown()
    metrics, = server.recorder.of("metrics")
    logs, = server.recorder.of("logs")
    for received in (metrics, logs):
        assert received.content_encoding == "gzip"
        assert received.headers["content-type"] == "application/x-protobuf"
        assert received.headers["authorization"] == "Bearer s3cret"
        assert received.headers["user-agent"].startswith("flowtel/")
    assert sorted((p.name, p.kind, p.value, p.temporality, tuple(p.attributes.items()))
                  for p in server.recorder.points()) == [
        ("networkobservability_drop_bytes", "sum", 1500, "cumulative", (("reason", "NO_SOCKET"), ("direction", "ingress"))),
        ("networkobservability_tcp_state", "gauge", 2, "", (("state", "TIME_WAIT"),)),
    ]
    records = server.recorder.log_records()
    assert [any_to_python(r.body) for _, r in records] == [any_uuid(hubble.flow_json(pod_flow())),
                                                           any_uuid(hubble.flow_json(pod_flow(1)))]
    assert records[0][0]["k8s.node.name"] == NODE
    assert telemetry.get("otlphttp", "records_sent") == 4 and telemetry.get("otlphttp", "requests_sent") == 2


def test_compression_none_sends_plain_protobuf(server: HttpOtlpServer) -> None:
    exporter = make(server.endpoint, compression="none")
    try:
        exporter.consume([pod_flow()])
        exporter.flush()
    finally:
        exporter.shutdown()
    received, = server.recorder.of("logs")
    assert received.content_encoding == "" and "content-encoding" not in received.headers


def test_signal_endpoints_override_the_base_url(server: HttpOtlpServer) -> None:
    cfg = OtlpHttpConfig.model_validate({"metrics_endpoint": f"{server.endpoint}/v1/metrics",
                                         "logs_endpoint": "https://logs.example:4318/custom/logs"})
    assert cfg.urls() == {"metrics": f"{server.endpoint}/v1/metrics", "logs": "https://logs.example:4318/custom/logs"}
    assert OtlpHttpConfig.model_validate({"endpoint": "https://gw:4318/otlp/"}).urls() == {
        "metrics": "https://gw:4318/otlp/v1/metrics", "logs": "https://gw:4318/otlp/v1/logs"}


def test_delta_temporality(server: HttpOtlpServer) -> None:
    exporter = make(server.endpoint, temporality="delta")
    try:
        for value, counts in ((4, (1, 3)), (9, (2, 7))):
            exporter.consume([point("networkobservability_dns_response_count", value),
                              MetricPoint("flowtel_tcp_handshake_rtt_seconds", 0.001 * value, MetricKind.HISTOGRAM,
                                          time.time_ns(), {"pod": "shop/a"}, bounds=(0.005,), bucket_counts=counts,
                                          count=sum(counts))])
            exporter.flush()
    finally:
        exporter.shutdown()
    points = sorted(server.recorder.points(), key=lambda p: p.time_ns)
    sums = [p for p in points if p.kind == "sum"]
    assert [(p.value, p.temporality) for p in sums] == [(4, "delta"), (5, "delta")]
    assert sums[1].start_ns == sums[0].time_ns
    hists = [p for p in points if p.kind == "histogram"]
    assert [(p.temporality, p.bucket_counts, p.count) for p in hists] == [
        ("delta", (1, 3), 4), ("delta", (1, 4), 5)]
    assert hists[1].value == pytest.approx(0.005) and hists[1].start_ns == hists[0].time_ns


def test_cardinality_above_the_sdk_default_gets_through_unmerged(server: HttpOtlpServer) -> None:
    exporter = make(server.endpoint, max_batch_size=5000)
    try:
        exporter.consume([point("networkobservability_interface_stats", i, interface_name=f"veth{i}",
                                statistic_name="rx_dropped") for i in range(2100)])
        exporter.flush()
    finally:
        exporter.shutdown()
    points = server.recorder.points()
    assert len(points) == 2100 and len({p.attributes["interface_name"] for p in points}) == 2100
    assert not any("otel.metric.overflow" in p.attributes for p in points)


def test_an_outage_within_the_queue_bound_loses_nothing(server: HttpOtlpServer) -> None:
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry)
    try:
        exporter.consume([pod_flow(0)])
        exporter.flush()  # a kept-alive connection exists when the backend goes away
        server.stop()
        for b in range(1, 5):
            exporter.consume([pod_flow(b)])
        assert wait_until(lambda: telemetry.get("otlphttp", "send_retries") >= 3)
        server.start()
        assert exporter.drain(15)
    finally:
        exporter.shutdown()
    assert [r.time_unix_nano for _, r in server.recorder.log_records()] == [T0 + b for b in range(5)]
    assert telemetry.get("otlphttp", "records_dropped") == 0


def test_overflow_beyond_the_queue_is_counted_exactly(server: HttpOtlpServer) -> None:
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry, sending_queue={"queue_size": 2})
    server.stop()
    try:
        exporter.consume([pod_flow(0)])
        assert wait_until(lambda: telemetry.get("otlphttp", "send_retries") >= 1)
        for b in range(1, 6):
            exporter.consume([pod_flow(b) for _ in range(3)])
        assert telemetry.get("otlphttp", "send_queue_overflow") == 9
        server.start()
        assert exporter.drain(15)
    finally:
        exporter.shutdown()
    assert sorted({r.time_unix_nano for _, r in server.recorder.log_records()}) == [T0, T0 + 1, T0 + 2]
    assert telemetry.get("otlphttp", "records_sent") == 7
    assert telemetry.get("otlphttp", "records_dropped") == 9


def test_a_client_error_is_permanent(server: HttpOtlpServer) -> None:
    telemetry = Telemetry()
    server.recorder.faults.append(Fault(times=1, http_status=400, message="bad data"))
    exporter = make(server.endpoint, telemetry)
    try:
        exporter.consume([pod_flow()])
        exporter.flush()
    finally:
        exporter.shutdown()
    assert server.recorder.requests_seen == 1
    assert telemetry.get("otlphttp", "send_retries") == 0 and telemetry.get("otlphttp", "records_send_failed") == 1


def test_unavailable_with_retry_after_is_retried_after_the_servers_delay(server: HttpOtlpServer) -> None:
    telemetry = Telemetry()
    server.recorder.faults.append(Fault(times=1, http_status=503, retry_after=1))
    exporter = make(server.endpoint, telemetry, retry_on_failure={**FAST_RETRY, "initial_interval": "30s",
                                                                  "max_interval": "30s", "max_elapsed_time": "1m"})
    try:
        started = time.monotonic()
        exporter.consume([pod_flow()])
        assert exporter.drain(6)
        assert 0.9 < time.monotonic() - started < 6
    finally:
        exporter.shutdown()
    # The SDK exporter waited the 1 s Retry-After within its 2 s timeout and resent: one
    # export call, two requests on the wire, and the resend counted.
    assert server.recorder.requests_seen == 2
    assert server.recorder.log_count() == 1 and telemetry.get("otlphttp", "send_retries") == 1


def test_a_retry_after_beyond_the_timeout_is_waited_by_the_sending_queue(server: HttpOtlpServer) -> None:
    telemetry = Telemetry()
    server.recorder.faults.append(Fault(times=1, http_status=429, retry_after=2))
    exporter = make(server.endpoint, telemetry, timeout="1s",
                    retry_on_failure={**FAST_RETRY, "initial_interval": "30s", "max_interval": "30s",
                                      "max_elapsed_time": "1m"})
    try:
        started = time.monotonic()
        exporter.consume([point("networkobservability_dns_request_count", 1)])
        exporter.collect()
        assert exporter.drain(8)
        # Not the 30 s backoff: the server's 2 s, which did not fit the SDK's 1 s call.
        assert 1.9 < time.monotonic() - started < 8
    finally:
        exporter.shutdown()
    assert server.recorder.requests_seen == 2 and len(server.recorder.points()) == 1
    assert telemetry.get("otlphttp", "send_retries") == 1 and telemetry.get("otlphttp", "records_send_failed") == 0


def test_partial_success_rejections_are_counted(server: HttpOtlpServer) -> None:
    telemetry = Telemetry()
    server.recorder.faults.append(Fault(times=1, rejected=1))
    exporter = make(server.endpoint, telemetry)
    try:
        exporter.consume([point("a", 1), point("b", 1), point("c", 1)])
        exporter.flush()
    finally:
        exporter.shutdown()
    assert telemetry.get("otlphttp", "records_sent") == 2 and telemetry.get("otlphttp", "records_send_failed") == 1


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_https_verifies_the_server_against_ca_file(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    # Many images set these; requests would let them override the configured CA.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    srv = HttpOtlpServer(ssl_context=context).start()
    try:
        telemetry = Telemetry()
        exporter = make(srv.endpoint, telemetry, tls={"ca_file": str(pki.ca_file)})
        exporter.consume([pod_flow()])
        exporter.consume([point("networkobservability_drop_count", 2, reason="NO_SOCKET", direction="ingress")])
        exporter.flush()
        exporter.shutdown()
        assert srv.recorder.log_count() == 1
        assert [(p.name, p.value) for p in srv.recorder.points()] == [("networkobservability_drop_count", 2)]
        assert telemetry.get("otlphttp", "records_sent") == 2

        # System roots do not know the test CA: refused, unless verification is switched off.
        untrusted = Telemetry()
        exporter = make(srv.endpoint, untrusted, retry_on_failure={"enabled": False})
        exporter.consume([pod_flow()])
        exporter.flush()
        exporter.shutdown()
        assert untrusted.get("otlphttp", "records_send_failed") == 1 and srv.recorder.log_count() == 1
        exporter = make(srv.endpoint, Telemetry(), tls={"insecure_skip_verify": True})
        exporter.consume([pod_flow()])
        exporter.flush()
        exporter.shutdown()
        assert srv.recorder.log_count() == 2
    finally:
        srv.stop()


def test_unreadable_tls_file_is_a_start_error(tmp_path: Path) -> None:
    exporter = OtlpHttpExporter(settings("otlphttp"), OtlpHttpConfig.model_validate(
        {"endpoint": "https://127.0.0.1:1", "tls": {"ca_file": str(tmp_path / "nope.pem")}}))
    with pytest.raises(StartError, match="cannot load the TLS files"):
        exporter.start()


@pytest.mark.parametrize("data, message", [
    ({}, "set endpoint"),
    ({"endpoint": "localhost:4318"}, "must be an http:// or https:// URL"),
    ({"endpoint": "http://c:99999"}, "invalid port"),
    ({"endpoint": "http://c:4318", "tls": {"ca_file": "/ca.pem"}}, "every URL is http://"),
    ({"endpoint": "https://c:4318", "tls": {"insecure": True}}, "applies to gRPC only"),
    ({"metrics_endpoint": "http://c:4318/v1/metrics"}, "both metrics_endpoint and logs_endpoint"),
])
def test_config_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        OtlpHttpConfig.model_validate(data)


def test_factory() -> None:
    assert (FACTORY.type, FACTORY.kind, tuple(FACTORY.signals)) == ("otlphttp", Kind.EXPORTER, ("metrics", "logs"))
