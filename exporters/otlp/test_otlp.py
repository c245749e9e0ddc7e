"""The otlp (gRPC) exporter against a real OTLP gRPC server: content, TLS, headers, gzip,
temporality, cardinality, and the sending queue through backend outages."""
from __future__ import annotations

from tests.support.wire import any_uuid, any_uuid_envelope

import json
import logging
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from pydantic import ValidationError

from flowtel.lib.exporterhelper import otlp_exporter
from exporters.otlp.config import OtlpGrpcConfig
from exporters.otlp.exporter import OtlpGrpcExporter
from exporters.otlp.factory import FACTORY
from flowtel.lib.hubble import convert as hubble, printer, summary as _summary, timefmt
from flowtel.component import (
    ComponentConfig,
    Consumer,
    CreateSettings,
    Kind,
    Receiver,
    ReceiverFactory,
    Telemetry,
)
from flowtel.config import parse_config
from flowtel.errors import StartError
from flowtel.pipeline import Service
from flowtel.records import Endpoint, LostEvents, MetricKind, MetricPoint, Verdict
from flowtel.registry import factories_by_kind
from tests.support.certs import Pki, make_pki
from tests.support.exporting import NODE, T0, point, pod_flow, settings, wait_until
from tests.support.otlp_receiver import Fault, GrpcOtlpServer, any_to_python
from tests.support.tcp_relay import TcpRelay

FAST_RETRY = {"initial_interval": "50ms", "max_interval": "100ms", "max_elapsed_time": "20s",
              "randomization_factor": 0}


@pytest.fixture
def server() -> Iterator[GrpcOtlpServer]:
    srv = GrpcOtlpServer().start()
    yield srv
    srv.stop()


def make(endpoint: str, telemetry: Telemetry | None = None, **cfg: Any) -> OtlpGrpcExporter:
    data: dict[str, Any] = {"endpoint": endpoint, "tls": {"insecure": True}, "export_interval": "1h",
                            "retry_on_failure": FAST_RETRY, "timeout": "2s"}
    data.update(cfg)
    exporter = OtlpGrpcExporter(settings("otlp", telemetry), OtlpGrpcConfig.model_validate(data))
    exporter.start()
    return exporter


# --- metrics --------------------------------------------------------------------------------


def test_metrics_arrive_with_exact_names_attributes_values_and_cumulative_sums(server: GrpcOtlpServer) -> None:
    exporter = make(server.endpoint, headers={"X-Tenant": "team-a"})
    try:
        exporter.consume([
            point("networkobservability_drop_count", 5, reason="IPTABLE_RULE_DROP", direction="ingress"),
            point("networkobservability_drop_count", 2, reason="TCP_CONNECT_BASIC", direction="egress"),
            point("hubble_flows_processed_total", 7, protocol="TCP", type="Trace", subtype="to-endpoint",
                  verdict="FORWARDED", source="shop/frontend-7c9d"),
            MetricPoint("networkobservability_tcp_state", 3, MetricKind.GAUGE, time.time_ns(),
                        {"state": "ESTABLISHED"}, unit="{connection}", description="TCP sockets by state"),
        ])
        exporter.flush()
        exporter.consume([point("networkobservability_drop_count", 8, reason="IPTABLE_RULE_DROP",
                                direction="ingress")])
        exporter.flush()
    finally:
        exporter.shutdown()
    first, second = server.recorder.of("metrics")
    assert first.headers["x-tenant"] == "team-a"
    resource = {kv.key: kv.value.string_value for kv in first.request.resource_metrics[0].resource.attributes}
    assert resource["service.name"] == "flowtel" and resource["k8s.node.name"] == NODE
    points = server.recorder.points()
    by = {(p.name, tuple(sorted(p.attributes.items())), p.time_ns): p for p in points}
    assert len(by) == len(points) == 8  # 4 series, each sent in both collections
    drops = sorted((p for p in points if p.name == "networkobservability_drop_count"
                    and p.attributes["reason"] == "IPTABLE_RULE_DROP"), key=lambda p: p.time_ns)
    assert [p.value for p in drops] == [5, 8]
    assert {p.temporality for p in drops} == {"cumulative"} and all(p.monotonic for p in drops)
    assert drops[0].start_ns == drops[1].start_ns < drops[0].time_ns < drops[1].time_ns
    assert drops[0].attributes == {"reason": "IPTABLE_RULE_DROP", "direction": "ingress"}
    flows = [p for p in points if p.name == "hubble_flows_processed_total"]
    assert flows[0].attributes == {"protocol": "TCP", "type": "Trace", "subtype": "to-endpoint",
                                   "verdict": "FORWARDED", "source": "shop/frontend-7c9d"}
    gauge = [p for p in points if p.name == "networkobservability_tcp_state"]
    assert [(g.kind, g.value, g.temporality, g.unit, g.description) for g in gauge] == [
        ("gauge", 3, "", "{connection}", "TCP sockets by state")] * 2


def test_delta_temporality_sends_differences_and_restarts_after_a_counter_reset(server: GrpcOtlpServer) -> None:
    exporter = make(server.endpoint, temporality="delta")
    try:
        for value in (10, 15, 15, 3):  # 3: the source's counter restarted
            exporter.consume([point("networkobservability_forward_bytes", value, direction="egress")])
            exporter.flush()
    finally:
        exporter.shutdown()
    points = sorted(server.recorder.points(), key=lambda p: p.time_ns)
    assert [p.value for p in points] == [10, 5, 0, 3]
    assert {p.temporality for p in points} == {"delta"}
    # Each delta covers the time since the previous collection.
    assert points[1].start_ns == points[0].time_ns and points[2].start_ns == points[1].time_ns


def test_histograms_and_source_start_times_arrive_exactly(server: GrpcOtlpServer) -> None:
    boot_ns = time.time_ns() - 3_600_000_000_000
    exporter = make(server.endpoint)
    try:
        exporter.consume([
            MetricPoint("flowtel_dns_latency_seconds", 0.0125, MetricKind.HISTOGRAM, time.time_ns(),
                        {"rcode": "No Error"}, "s", "DNS latency", bounds=(0.001, 0.01, 0.1),
                        bucket_counts=(1, 2, 0, 1), count=4),
            MetricPoint("networkobservability_tcp_connection_stats", 12, MetricKind.SUM, time.time_ns(),
                        {"statistic_name": "ActiveOpens"}, start_time_ns=boot_ns),
        ])
        exporter.flush()
    finally:
        exporter.shutdown()
    (request,) = server.recorder.of("metrics")
    # The SDK's exporter sends one ResourceMetrics with flowtel's scope.
    (rm,) = request.request.resource_metrics  # type: ignore[attr-defined]
    assert (rm.scope_metrics[0].scope.name, rm.scope_metrics[0].scope.version) == ("flowtel", otlp_exporter.FLOWTEL_VERSION)
    by_name = {p.name: p for p in server.recorder.points()}
    h = by_name["flowtel_dns_latency_seconds"]
    assert (h.kind, h.temporality, h.attributes, h.unit, h.description) == (
        "histogram", "cumulative", {"rcode": "No Error"}, "s", "DNS latency")
    assert (h.bounds, h.bucket_counts, h.count, h.value) == ((0.001, 0.01, 0.1), (1, 2, 0, 1), 4, 0.0125)
    assert not h.has_min_max  # unknown extremes are left out, not sent as 0
    assert 0 < h.start_ns < h.time_ns
    stats = by_name["networkobservability_tcp_connection_stats"]
    assert (stats.value, stats.is_int, stats.start_ns) == (12, True, boot_ns)  # the source's own start


def test_cardinality_above_the_sdk_default_gets_through_unmerged(server: GrpcOtlpServer) -> None:
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry)
    try:
        exporter.consume([point("hubble_flows_processed_total", i, source=f"shop/pod-{i}") for i in range(2500)])
        exporter.flush()
    finally:
        exporter.shutdown()
    points = server.recorder.points()
    assert len(points) == 2500
    assert {p.attributes["source"] for p in points} == {f"shop/pod-{i}" for i in range(2500)}
    assert not any("otel.metric.overflow" in p.attributes for p in points)
    assert sum(p.value for p in points) == sum(range(2500))
    assert len(server.recorder.of("metrics")) == 3  # max_batch_size 1000 per request
    assert telemetry.get("otlp", "series_refused") == 0


def test_series_beyond_the_cardinality_limit_are_refused_counted_and_reported(
    server: GrpcOtlpServer, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry, cardinality_limit=100)
    try:
        with caplog.at_level(logging.WARNING):
            exporter.consume([point("hubble_drop_total", 1, source=f"shop/pod-{i}") for i in range(150)])
        exporter.consume([point("hubble_drop_total", 9, source="shop/pod-0")])  # a known series still updates
        exporter.flush()
    finally:
        exporter.shutdown()
    points = server.recorder.points()
    assert len(points) == 100
    assert {p.attributes["source"] for p in points} == {f"shop/pod-{i}" for i in range(100)}
    assert [p.value for p in points if p.attributes["source"] == "shop/pod-0"] == [9]
    assert telemetry.get("otlp", "series_refused") == 50
    assert telemetry.get("otlp", "records_dropped") == 50
    assert "hubble_drop_total has 100 series, the cardinality_limit" in caplog.text


def test_series_without_new_points_expire(server: GrpcOtlpServer) -> None:
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry, series_ttl="300ms")
    try:
        exporter.consume([point("hubble_drop_total", 1, source="shop/gone"),
                          point("hubble_drop_total", 1, source="shop/alive")])
        time.sleep(0.4)
        exporter.consume([point("hubble_drop_total", 2, source="shop/alive")])
        exporter.flush()
    finally:
        exporter.shutdown()
    assert [(p.attributes["source"], p.value) for p in server.recorder.points()] == [("shop/alive", 2)]
    assert telemetry.get("otlp", "series_expired") == 1


def test_metrics_are_sent_every_export_interval(server: GrpcOtlpServer) -> None:
    exporter = make(server.endpoint, export_interval="100ms")
    try:
        exporter.consume([point("networkobservability_dns_request_count", 4)])
        assert server.recorder.wait_for(lambda r: len(r.of("metrics")) >= 3, timeout=5)
    finally:
        exporter.shutdown()
    assert {p.value for p in server.recorder.points()} == {4}


# --- logs -----------------------------------------------------------------------------------


def log_attributes(record: Any) -> dict[str, object]:
    return {kv.key: any_to_python(kv.value) for kv in record.attributes}


def test_flow_logs_carry_the_hubble_flow_as_body_and_otel_attributes(server: GrpcOtlpServer) -> None:
    forwarded = pod_flow()
    dropped = pod_flow(1, verdict=Verdict.DROPPED, drop_reason="NETFILTER_DROP", ip_version=6,
                       src_ip="fd00::5", dst_ip="fd00::9", protocol=17, destination=None, ifname="")
    ping = pod_flow(2, protocol=1, src_port=8, dst_port=0, source=None, destination=Endpoint(pod_name="solo"))
    lost = LostEvents(time_ns=T0, source="PERF_EVENT_RING_BUFFER", count=17, node_name=NODE)
    exporter = make(server.endpoint)
    try:
        exporter.consume([forwarded, dropped, ping, lost])
        exporter.flush()
    finally:
        exporter.shutdown()
    records = server.recorder.log_records()
    assert len(records) == 4
    resource, first = records[0]
    assert resource["service.name"] == "flowtel" and resource["k8s.node.name"] == NODE
    assert any_to_python(first.body) == hubble.flow_json(forwarded)
    assert first.time_unix_nano == T0
    assert (first.severity_number, first.severity_text, first.event_name) == (9, "INFO", "flowtel.flow")
    assert log_attributes(first) == {
        "source.address": "10.1.0.5", "source.port": 41234, "destination.address": "10.1.0.9",
        "destination.port": 80, "network.transport": "tcp", "network.type": "ipv4",
        "network.interface.name": "veth1a2b",
        "source.k8s.namespace.name": "shop", "source.k8s.pod.name": "frontend-7c9d",
        "source.k8s.deployment.name": "frontend",
        "destination.k8s.namespace.name": "shop", "destination.k8s.pod.name": "payments-0",
    }
    _, second = records[1]
    assert (second.severity_number, second.severity_text) == (13, "WARN")
    assert any_to_python(second.body)["extensions"]["value"]["drop_reason"] == "NETFILTER_DROP"  # type: ignore[index]
    assert log_attributes(second) == {
        "source.address": "fd00::5", "source.port": 41235, "destination.address": "fd00::9",
        "destination.port": 80, "network.transport": "udp", "network.type": "ipv6",
        "source.k8s.namespace.name": "shop", "source.k8s.pod.name": "frontend-7c9d",
        "source.k8s.deployment.name": "frontend",
    }
    _, third = records[2]
    assert log_attributes(third) == {  # ICMP type/code are not ports
        "source.address": "10.1.0.5", "destination.address": "10.1.0.9", "network.transport": "icmp",
        "network.type": "ipv4", "network.interface.name": "veth1a2b", "destination.k8s.pod.name": "solo",
    }
    _, fourth = records[3]
    assert any_to_python(fourth.body) == {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "17"}
    assert (fourth.severity_text, fourth.event_name) == ("WARN", "flowtel.lost_events")
    assert log_attributes(fourth) == {"flowtel.lost_events.source": "PERF_EVENT_RING_BUFFER"}


def test_empty_objects_of_the_hubble_flow_stay_empty_maps_in_the_body(server: GrpcOtlpServer) -> None:
    """``{}`` in the flow (a TCP flow with no flags seen, a frame that is not IP, an endpoint
    with nothing known, an ICMP echo reply's type and code 0) is an empty kvlist in the body,
    not an unset value (which reads as null: the body differed from the flow file's)."""
    flows = [pod_flow(0, tcp_flags=0), pod_flow(1, ip_version=0, ethertype=0x0806, protocol=0, src_ip="", dst_ip="",
                                              src_port=0, dst_port=0, tcp_flags=0, source=Endpoint()),
             pod_flow(2, protocol=1, src_port=0, dst_port=0)]
    exporter = make(server.endpoint)
    try:
        exporter.consume(flows)
        exporter.flush()
    finally:
        exporter.shutdown()
    bodies = [any_to_python(lr.body) for _, lr in server.recorder.log_records()]
    assert bodies == [hubble.flow_json(f) for f in flows]
    assert bodies[0]["l4"]["TCP"]["flags"] == {} and bodies[1]["ethernet"] == {}  # type: ignore[index]
    assert bodies[1]["source"] == {} and bodies[2]["l4"] == {"ICMPv4": {}}  # type: ignore[index]


def test_a_backend_stopping_under_load_receives_each_record_once(server: GrpcOtlpServer) -> None:
    """The test backend's outage (stop, start on the same port) while the exporter sends a
    request every few milliseconds: every record arrives, none twice. A stop that cancels
    calls it already recorded made the exporter resend them (it was told they failed), so
    the outage test counted records delivered twice: 20-80 of ~17k here, in each of 5 runs."""
    exporter = make(server.endpoint, sending_queue={"queue_size": 100_000})
    sent = 0
    stop = threading.Event()

    def feed() -> None:
        nonlocal sent
        while not stop.is_set():
            exporter.consume([pod_flow(sent + k, src_port=1 + (sent + k) % 65535) for k in range(20)])
            sent += 20
            time.sleep(0.001)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        rng = random.Random(7)
        for _ in range(40):
            time.sleep(rng.uniform(0.02, 0.08))
            server.stop()
            time.sleep(0.02)
            server.start()
    finally:
        stop.set()
        feeder.join()
    try:
        assert exporter.drain(30)
        uuids = Counter(any_to_python(lr.body)["uuid"] for _, lr in server.recorder.log_records())  # type: ignore[index, attr-defined]
        twice = sum(1 for n in uuids.values() if n > 1)
        assert (len(uuids), twice) == (sent, 0)
    finally:
        exporter.shutdown()


def test_log_body_json_is_the_compact_hubble_object(server: GrpcOtlpServer) -> None:
    exporter = make(server.endpoint, log_body="json")
    try:
        exporter.consume([pod_flow()])
        exporter.flush()
    finally:
        exporter.shutdown()
    (_, record), = server.recorder.log_records()
    body = record.body.string_value
    assert json.loads(body) == any_uuid(hubble.flow_json(pod_flow())) and '": ' not in body  # compact separators


def test_flow_log_filters_and_field_mask_apply_to_logs_only(server: GrpcOtlpServer) -> None:
    from tests.flowsamples import sample_flows

    flows = sample_flows()
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry, allow_list=[{"destination_pod": ["shop/"]}],
                    deny_list=[{"verdict": ["DROPPED"]}], field_mask=["verdict", "destination.pod_name"],
                    log_body="json")
    try:
        exporter.consume(list(flows.values()))
        exporter.consume([point("m", 1.0)])  # metrics are not filtered
        exporter.flush()
    finally:
        exporter.shutdown()
    records = [r for _, r in server.recorder.log_records()]
    assert [json.loads(r.body.string_value) for r in records] == [
        {"verdict": "FORWARDED", "destination": {"pod_name": name}}
        for name in ("payments-0", "frontend-7c9d", "frontend-7c9d", "payments-0")]  # F1, F2, F5, F7
    # Attributes follow the mask: only the one repeating a kept field (flowtel/lib/exporterhelper/flowlog_filter.py).
    assert log_attributes(records[0]) == {"destination.k8s.pod.name": "payments-0"}
    assert telemetry.get("otlp", "records_filtered") == 5
    assert telemetry.get("otlp", "records_in") == 10
    assert telemetry.get("otlp", "records_send_failed") == 0


def test_a_batch_that_is_not_flow_logs_fails_without_sending(server: GrpcOtlpServer) -> None:
    exporter = make(server.endpoint)
    try:
        with pytest.raises(TypeError, match="not a flow-log record: dict"):
            exporter.consume([pod_flow(), {"not": "a record"}])  # type: ignore[list-item]
        exporter.flush()
    finally:
        exporter.shutdown()
    assert server.recorder.requests_seen == 0


# --- transport: TLS, headers, compression ---------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_server(pki: Pki, require_client_auth: bool) -> GrpcOtlpServer:
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca_file.read_bytes() if require_client_auth else None,
        require_client_auth=require_client_auth,
    )
    return GrpcOtlpServer(server_credentials=credentials).start()


def test_tls_with_a_private_ca_and_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    srv = tls_server(pki, require_client_auth=True)
    telemetry = Telemetry()
    try:
        good = make(srv.endpoint, telemetry, tls={"ca_file": str(pki.ca_file), "cert_file": str(pki.client_cert),
                                                  "key_file": str(pki.client_key)})
        good.consume([pod_flow()])
        good.consume([point("networkobservability_forward_count", 3, direction="egress")])
        good.flush()
        good.shutdown()
        assert srv.recorder.log_count() == 1 and telemetry.get("otlp", "records_sent") == 2
        assert [(p.name, p.value) for p in srv.recorder.points()] == [("networkobservability_forward_count", 3)]

        # Without a client certificate the server refuses the handshake: counted, not delivered.
        no_client = Telemetry()
        anonymous = make(srv.endpoint, no_client, tls={"ca_file": str(pki.ca_file)},
                         retry_on_failure={"enabled": False})
        anonymous.consume([pod_flow()])
        anonymous.flush()
        anonymous.shutdown()
        assert no_client.get("otlp", "records_send_failed") == 1
        assert srv.recorder.log_count() == 1
    finally:
        srv.stop()

    other = make_pki(tmp_path / "other", ca_name="someone else")
    srv = tls_server(pki, require_client_auth=False)
    try:
        # A CA that did not sign the server's certificate: the server is not trusted.
        wrong = Telemetry()
        untrusted = make(srv.endpoint, wrong, tls={"ca_file": str(other.ca_file)},
                         retry_on_failure={"enabled": False})
        untrusted.consume([pod_flow()])
        untrusted.flush()
        untrusted.shutdown()
        assert wrong.get("otlp", "records_send_failed") == 1 and srv.recorder.log_count() == 0
        # Plaintext to a TLS server fails too.
        plain = Telemetry()
        insecure = make(srv.endpoint, plain, retry_on_failure={"enabled": False})
        insecure.consume([pod_flow()])
        insecure.flush()
        insecure.shutdown()
        assert plain.get("otlp", "records_send_failed") == 1 and srv.recorder.log_count() == 0
    finally:
        srv.stop()


def test_unreadable_tls_file_is_a_start_error_with_a_remedy(tmp_path: Path) -> None:
    exporter = OtlpGrpcExporter(settings("otlp"), OtlpGrpcConfig.model_validate(
        {"endpoint": "127.0.0.1:1", "tls": {"ca_file": str(tmp_path / "missing.pem")}}))
    with pytest.raises(StartError, match=r"cannot read tls.ca_file .*missing.pem: No such file") as info:
        exporter.start()
    assert "mount the certificate secret" in str(info.value)


def test_gzip_compression_shrinks_what_goes_on_the_wire(server: GrpcOtlpServer) -> None:
    sizes = {}
    for compression in ("none", "gzip"):
        relay = TcpRelay(server.port)
        exporter = make(f"127.0.0.1:{relay.port}", compression=compression)
        try:
            exporter.consume([pod_flow(i) for i in range(300)])
            exporter.flush()
        finally:
            exporter.shutdown()
            relay.close()
        sizes[compression] = relay.client_bytes
    assert server.recorder.log_count() == 600
    assert sizes["gzip"] * 5 < sizes["none"], sizes


# --- the sending queue: outages, overflow, retry rules ---------------------------------------


def test_an_outage_within_the_queue_bound_loses_nothing(server: GrpcOtlpServer) -> None:
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry, sending_queue={"queue_size": 10})
    server.stop()
    try:
        batches = [[pod_flow(10 * b + i) for i in range(10)] for b in range(5)]
        for batch in batches:
            exporter.consume(batch)
        exporter.consume([point("networkobservability_drop_count", 3, reason="NO_SOCKET")])
        exporter.collect()
        assert wait_until(lambda: telemetry.get("otlp", "send_retries") >= 3)
        assert server.recorder.requests_seen == 0
        server.start()
        assert exporter.drain(15)
    finally:
        exporter.shutdown()
    times = [record.time_unix_nano for _, record in server.recorder.log_records()]
    assert times == [T0 + i for i in range(50)]  # everything, once, in order
    assert [p.value for p in server.recorder.points()] == [3]
    assert telemetry.get("otlp", "records_sent") == 51
    assert telemetry.get("otlp", "records_dropped") == 0


def test_overflow_beyond_the_queue_is_counted_exactly(server: GrpcOtlpServer, caplog: pytest.LogCaptureFixture) -> None:
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry, sending_queue={"queue_size": 3})
    server.stop()
    try:
        exporter.consume([pod_flow(0, src_port=1)])
        # The first request is now being retried (out of the queue); three more fit, two do not.
        assert wait_until(lambda: telemetry.get("otlp", "send_retries") >= 1)
        with caplog.at_level(logging.WARNING):
            for b in range(1, 6):
                exporter.consume([pod_flow(b, src_port=b) for _ in range(7)])
        assert telemetry.get("otlp", "send_queue_overflow") == 14
        assert telemetry.get("otlp", "records_dropped") == 14
        assert "sending queue full (3 requests)" in caplog.text
        server.start()
        assert exporter.drain(15)
    finally:
        exporter.shutdown()
    ports = sorted({log_attributes(r)["source.port"] for _, r in server.recorder.log_records()})  # type: ignore[type-var]
    assert ports == [1, 2, 3]  # the first request and the three queued after it
    assert server.recorder.log_count() == 1 + 3 * 7
    assert telemetry.get("otlp", "records_sent") == 22


def test_a_request_is_given_up_and_counted_after_max_elapsed_time(server: GrpcOtlpServer) -> None:
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry, retry_on_failure={**FAST_RETRY, "max_elapsed_time": "400ms"})
    server.stop()
    try:
        exporter.consume([pod_flow(i) for i in range(4)])
        assert wait_until(lambda: telemetry.get("otlp", "records_send_failed") == 4, timeout=5)
        assert telemetry.get("otlp", "send_retries") >= 2  # 50 ms, 100 ms, …: retry_on_failure's own
        server.start()
        exporter.consume([pod_flow(99)])
        assert exporter.drain(10)
    finally:
        exporter.shutdown()
    assert [r.time_unix_nano for _, r in server.recorder.log_records()] == [T0 + 99]
    assert telemetry.get("otlp", "records_dropped") == 4


def test_a_permanent_error_is_not_retried(server: GrpcOtlpServer) -> None:
    telemetry = Telemetry()
    server.recorder.faults.append(Fault(times=1, grpc_code=grpc.StatusCode.INVALID_ARGUMENT))
    exporter = make(server.endpoint, telemetry)
    try:
        exporter.consume([pod_flow(), pod_flow(1)])
        exporter.flush()
    finally:
        exporter.shutdown()
    assert server.recorder.requests_seen == 1
    assert telemetry.get("otlp", "send_retries") == 0
    assert telemetry.get("otlp", "records_send_failed") == 2


def test_throttling_with_retry_info_is_honoured_and_without_it_is_permanent(server: GrpcOtlpServer) -> None:
    telemetry = Telemetry()
    server.recorder.faults.append(Fault(times=1, grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=0.2))
    slow = {**FAST_RETRY, "initial_interval": "30s", "max_interval": "30s", "max_elapsed_time": "60s"}
    exporter = make(server.endpoint, telemetry, retry_on_failure=slow)
    try:
        started = time.monotonic()
        exporter.consume([pod_flow()])
        assert exporter.drain(5), "the server's 0.2 s RetryInfo should win over the 30 s backoff"
        assert 0.15 < time.monotonic() - started < 5
        assert server.recorder.log_count() == 1 and telemetry.get("otlp", "send_retries") == 1
        server.recorder.faults.append(Fault(times=1, grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED))
        exporter.consume([pod_flow(1)])
        assert exporter.drain(5)
    finally:
        exporter.shutdown()
    assert telemetry.get("otlp", "records_send_failed") == 1 and telemetry.get("otlp", "send_retries") == 1


def test_partial_success_rejections_are_counted(server: GrpcOtlpServer) -> None:
    telemetry = Telemetry()
    server.recorder.faults.append(Fault(times=1, rejected=2, message="2 records too old"))
    exporter = make(server.endpoint, telemetry)
    try:
        exporter.consume([pod_flow(i) for i in range(5)])
        exporter.flush()
    finally:
        exporter.shutdown()
    assert telemetry.get("otlp", "records_sent") == 3
    assert telemetry.get("otlp", "records_send_failed") == 2


def test_without_a_queue_sending_happens_in_consume_and_failures_raise_nothing(server: GrpcOtlpServer) -> None:
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry, sending_queue={"enabled": False})
    try:
        exporter.consume([pod_flow()])
        assert server.recorder.log_count() == 1  # already delivered when consume returned
    finally:
        exporter.shutdown()
    assert telemetry.snapshot()[("otlp", "send_queue_capacity")] == 0


def test_requests_still_queued_at_shutdown_are_counted(server: GrpcOtlpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otlp_exporter, "SHUTDOWN_DRAIN_SECONDS", 0.3)
    telemetry = Telemetry()
    exporter = make(server.endpoint, telemetry)
    server.stop()
    for b in range(3):
        exporter.consume([pod_flow(b)])
    started = time.monotonic()
    exporter.flush()  # as the agent does: flush, then shutdown; a dead backend is waited for once
    exporter.shutdown()
    assert time.monotonic() - started < 0.3 + 0.5
    assert telemetry.get("otlp", "records_dropped") == 3
    assert telemetry.get("otlp", "records_send_failed") + telemetry.get("otlp", "records_dropped_at_shutdown") == 3


# --- config, factory, and the agent's runtime ------------------------------------------------


def test_config_defaults_follow_the_collector() -> None:
    cfg = OtlpGrpcConfig.model_validate({"endpoint": "otel-collector:4317"})
    assert (cfg.compression, cfg.timeout, cfg.tls.insecure, cfg.temporality) == ("gzip", 5.0, False, "cumulative")
    r = cfg.retry_on_failure
    assert (r.enabled, r.initial_interval, r.max_interval, r.max_elapsed_time) == (True, 5.0, 30.0, 300.0)
    assert (cfg.sending_queue.enabled, cfg.sending_queue.queue_size) == (True, 100)
    assert (cfg.cardinality_limit, cfg.series_ttl, cfg.log_body) == (100_000, 300.0, "map")


@pytest.mark.parametrize("data, message", [
    ({"endpoint": "http://collector:4317"}, "without a scheme"),
    ({"endpoint": ""}, "host:port"),
    ({"endpoint": "c:4317", "tls": {"insecure_skip_verify": True}}, "not available for gRPC"),
    ({"endpoint": "c:4317", "tls": {"cert_file": "/c.pem"}}, "cert_file and key_file go together"),
    ({"endpoint": "c:4317", "tls": {"insecure": True, "ca_file": "/ca.pem"}}, "insecure: true turns TLS off"),
    ({"endpoint": "c:4317", "compression": "zstd"}, "gzip"),
    ({"endpoint": "c:4317", "temporality": "cumulativ"}, "delta"),
    ({"endpoint": "c:4317", "retry_on_failure": {"initial_interval": "10s", "max_interval": "1s"}},
     "must not be less than initial_interval"),
    ({"endpoint": "c:4317", "sending_queue": {"queue_size": 0}}, "greater than or equal to 1"),
    ({"endpoint": "c:4317", "headers": {"bad name": "x"}}, "not a valid HTTP header"),
    ({"endpoint": "c:4317", "timout": "1s"}, "Extra inputs are not permitted"),
])
def test_config_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        OtlpGrpcConfig.model_validate(data)


class _Cfg(ComponentConfig):
    pass


class _Source(Receiver):
    """Emits metric points and flows at shutdown, like a receiver's last drain."""

    def __init__(self, settings: CreateSettings, config: _Cfg, next_consumer: Consumer) -> None:
        super().__init__(settings, next_consumer)

    def shutdown(self) -> None:
        self.next_consumer.consume([point("networkobservability_forward_count", 42, direction="ingress")])
        self.next_consumer.consume([pod_flow()])


def test_the_agent_flushes_metrics_and_logs_to_otlp_when_it_stops(server: GrpcOtlpServer) -> None:
    factories = factories_by_kind()
    factories[Kind.RECEIVER]["src"] = ReceiverFactory("src", _Cfg, _Source)
    config = parse_config({
        "receivers": {"src": {}},
        "exporters": {"otlp": {"endpoint": server.endpoint, "tls": {"insecure": True}}},
        "service": {"pipelines": {"metrics": {"receivers": ["src"], "exporters": ["otlp"]},
                                  "logs": {"receivers": ["src"], "exporters": ["otlp"]}}},
    }, "test.yaml", factories=factories, environ={})
    service = Service(config, node_name=NODE, factories=factories)
    service.start()
    service.shutdown()
    assert [(p.name, p.value) for p in server.recorder.points()] == [("networkobservability_forward_count", 42)]
    assert server.recorder.log_count() == 1
    assert service.telemetry.get("otlp", "records_in") == 2


def test_factory() -> None:
    assert (FACTORY.type, FACTORY.kind, tuple(FACTORY.signals)) == ("otlp", Kind.EXPORTER, ("metrics", "logs"))
    assert FACTORY.config_class is OtlpGrpcConfig
