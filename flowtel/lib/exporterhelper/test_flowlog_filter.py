"""Flow-log allow/deny filters and field mask (Hubble's exporter semantics) over tests/flowsamples,
and the mask's rule for the OTLP log record's attributes (encoder and a real OTLP receiver)."""
from __future__ import annotations

from tests.support.wire import any_uuid, any_uuid_envelope

from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from pydantic import ValidationError

from flowtel.lib.exporterhelper.flowlog_filter import FlowLogFilter, FlowLogFilterConfig
from flowtel.lib.exporterhelper.otlp_encoding import OtlpEncoder, any_value_to_python
from exporters.file.factory import FACTORY
from exporters.otlp.config import OtlpGrpcConfig
from exporters.otlp.exporter import OtlpGrpcExporter
from flowtel.lib.hubble import convert as hubble, printer, summary as _summary, timefmt
from flowtel.component import Kind
from flowtel.config import ConfigError, parse_config
from flowtel.records import Endpoint, Flow, Workload, replace
from tests.flowsamples import lost, sample_flows
from tests.support.exporting import settings
from tests.support.otlp_receiver import GrpcOtlpServer, any_to_python


def selected(**cfg: Any) -> list[str]:
    flt = FlowLogFilter(FlowLogFilterConfig.model_validate(cfg))
    flows = sample_flows()
    kept = flt.select(list(flows.values()))
    return [name for name, f in flows.items() if any(k is f for k in kept)]


def test_no_filters_export_everything() -> None:
    assert selected() == [f"F{i}" for i in range(1, 10)]


def test_allow_only_ors_values_and_ands_fields() -> None:
    assert selected(allow_list=[{"source_pod": ["kube-system/"]}]) == ["F5"]
    assert selected(allow_list=[{"source_pod": ["kube-system/", "default/"]}]) == ["F3", "F5", "F7"]
    # AND across fields of one object
    assert selected(allow_list=[{"source_pod": ["shop/"], "protocol": ["tcp"]}]) == ["F1", "F2", "F6"]
    assert selected(allow_list=[{"source_pod": ["shop/frontend"], "destination_port": [53]}]) == ["F4"]


def test_deny_only() -> None:
    assert selected(deny_list=[{"verdict": ["DROPPED"]}]) == ["F1", "F2", "F4", "F5", "F6", "F7", "F8", "F9"]
    assert selected(deny_list=[{"protocol": ["tcp", "udp"]}]) == ["F7", "F8"]


def test_allow_and_deny() -> None:
    assert selected(allow_list=[{"destination_pod": ["shop/"]}],
                    deny_list=[{"verdict": ["DROPPED"]}]) == ["F1", "F2", "F5", "F7"]


def test_multiple_objects_or() -> None:
    # Hubble's semantics: destination_fqdn is the flow's destination_names (F6); the DNS
    # lookups of the name (F4, F5) are matched by dns_query.
    assert selected(allow_list=[{"verdict": ["DROPPED"]}, {"destination_fqdn": ["*.example.com"]}]) == ["F3", "F6"]
    assert selected(allow_list=[{"verdict": ["DROPPED"]}, {"dns_query": [r"\.example\.com\.$"]}]) == [
        "F3", "F4", "F5"]
    assert selected(deny_list=[{"source_ip": ["10.0.0.0/24"]}, {"event_type": ["l7"]}]) == ["F3", "F7", "F8", "F9"]
    assert selected(allow_list=[{"source_label": ["k8s:app=client"]}, {"source_fqdn": ["api.*"]}]) == [
        "F3", "F7", "F9"]


def test_lost_events_always_pass() -> None:
    flt = FlowLogFilter(FlowLogFilterConfig.model_validate({"allow_list": [{"verdict": ["DROPPED"]}]}))
    record = lost()
    assert flt.select([record]) == [record]


def test_hubble_event_type_objects_and_numeric_ports_are_accepted() -> None:
    assert selected(allow_list=[{"event_type": [{"type": 1}]}]) == ["F3"]
    assert selected(allow_list=[{"event_type": [{"type": 4, "sub_type": 5}]}, {"source_port": [8080]}]) == [
        "F1", "F2", "F6", "F8"]


def masked(paths: list[str], name: str) -> dict[str, Any]:
    flt = FlowLogFilter(FlowLogFilterConfig(field_mask=paths))
    return flt.mask(hubble.flow_json(sample_flows()[name]))


def test_field_mask_keeps_only_the_paths_including_nested_ones() -> None:
    assert masked(["time", "source.namespace", "verdict", "IP.source"], "F1") == {
        "time": "2024-11-26T11:45:46Z", "verdict": "FORWARDED",
        "IP": {"source": "10.0.0.1"}, "source": {"namespace": "shop"}}
    assert masked(["l4"], "F1") == {"l4": {"TCP": {"source_port": 41000, "destination_port": 8080,
                                                   "flags": {"SYN": True}}}}
    assert masked(["l4.TCP.flags", "source.workloads.kind", "l7.dns.query"], "F1") == {
        "l4": {"TCP": {"flags": {"SYN": True}}}, "source": {"workloads": [{"kind": "Deployment"}]}}
    # a path absent from this flow leaves nothing behind, not an empty object
    assert masked(["l4.TCP.source_port", "l7.dns.query", "extensions.packets"], "F5") == {
        "l7": {"dns": {"query": "www.example.com."}}}
    # a whole object wins over a path inside it, in either order
    assert masked(["source.namespace", "source"], "F2") == masked(["source"], "F2") == {
        "source": hubble.flow_json(sample_flows()["F2"])["source"]}


def test_empty_mask_keeps_everything() -> None:
    flow = hubble.flow_json(sample_flows()["F3"])
    assert FlowLogFilter(FlowLogFilterConfig()).mask(flow) == flow


@pytest.mark.parametrize(("raw", "loc", "fragment"), [
    ({"allow_list": [{"namespace": ["shop"]}]}, ("allow_list", 0), "source_pod: ['NS/']"),
    ({"allow_list": [{"verdict": ["DROPPED"]}, {"verdict": ["DROP"]}]}, ("allow_list", 1, "verdict"), "'DROP'"),
    ({"deny_list": [{"source_ip": ["10.0.0.300"]}]}, ("deny_list", 0, "source_ip"), "invalid IP address"),
    ({"deny_list": [{"destination_port": ["99999"]}]}, ("deny_list", 0, "destination_port"), "0-65535"),
    ({"deny_list": [{"dns_query": ["(x"]}]}, ("deny_list", 0, "dns_query"), "invalid regular expression"),
    ({"deny_list": [{}]}, ("deny_list", 0), "matches every flow"),
    ({"allow_list": [{"source_fqdn": ["a b"]}]}, ("allow_list", 0, "source_fqdn"), "invalid FQDN"),
    ({"allow_list": ["shop/"]}, ("allow_list", 0), "expected a filter object"),
    ({"field_mask": ["time", "source.nmespace"]}, ("field_mask", 1), "did you mean 'namespace'"),
    ({"field_mask": ["verdict.reason"]}, ("field_mask", 0), "'verdict' is a value"),
    ({"field_mask": ["ip.source"]}, ("field_mask", 0), "did you mean 'IP'"),
    ({"field_mask": ["source."]}, ("field_mask", 0), "dotted path"),
])
def test_invalid_config_names_the_key(raw: dict[str, Any], loc: tuple[Any, ...], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        FlowLogFilterConfig.model_validate(raw)
    err = info.value.errors(include_url=False)[0]
    assert err["loc"] == loc
    assert fragment in err["msg"]


def test_config_error_through_the_loader_names_the_full_key_path() -> None:
    raw = {"exporters": {"file": {"path": "a.log",
                                  "allow_list": [{"source_pod": ["kube-system/"]}, {"verdict": ["DROPED"]}]}}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "agent.yaml", factories={Kind.EXPORTER: {"file": FACTORY}})
    assert "exporters.file.allow_list[1].verdict" in str(info.value)
    assert "DROPED" in str(info.value)


# --- the mask and the OTLP record's attributes -----------------------------------------------

def _pod(namespace: str, pod: str, workload: str, kind: str, uid: str) -> Endpoint:
    """An end as k8sattributes names it: Hubble fields and the OTel attributes beside them."""
    return Endpoint(namespace=namespace, pod_name=pod, labels=[f"k8s:app={workload}"], cluster_name="default",
                    workloads=[Workload(workload, kind)],
                    attributes={"k8s.namespace.name": namespace, "k8s.pod.name": pod, "k8s.pod.uid": uid,
                                "k8s.node.name": "node-1", f"k8s.{kind.lower()}.name": workload,
                                "k8s.pod.labels.app": workload, "k8s.namespace.labels.team": "payments",
                                "k8s.pod.annotations.owner": "web-team"})


def _named_flow() -> Flow:
    return replace(sample_flows()["F1"], source=_pod("shop", "frontend-7c9d", "frontend", "Deployment", "u-1"),
                               destination=_pod("shop", "payments-0", "payments", "StatefulSet", "u-2"))


SIDE = ("k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.node.name", "k8s.pod.labels.app",
        "k8s.namespace.labels.team", "k8s.pod.annotations.owner")
EVERY_ATTRIBUTE = {"source.address", "source.port", "destination.address", "destination.port", "network.transport",
                   "network.type", "network.interface.name",
                   *(f"source.{k}" for k in (*SIDE, "k8s.deployment.name")),
                   *(f"destination.{k}" for k in (*SIDE, "k8s.statefulset.name"))}


def encoded_attributes(paths: list[str], flow: Flow) -> tuple[dict[str, object], object]:
    """(attributes, body) of the one log record the OTLP encoder makes with this field mask."""
    mask = FlowLogFilter(FlowLogFilterConfig(field_mask=paths)).mask
    encoder = OtlpEncoder({"service.name": "flowtel"}, 10, "map", mask if mask.active else None)
    [(payload, count)] = list(encoder.logs([flow], 0))
    request = ExportLogsServiceRequest.FromString(payload)
    [record] = request.resource_logs[0].scope_logs[0].log_records
    return {kv.key: any_value_to_python(kv.value) for kv in record.attributes}, any_value_to_python(record.body)


@pytest.mark.parametrize(("paths", "kept"), [
    ([], EVERY_ATTRIBUTE),
    (["time", "verdict"], set()),
    (["IP"], {"source.address", "destination.address", "network.type"}),
    (["IP.source"], {"source.address"}),
    (["l4"], {"source.port", "destination.port", "network.transport"}),
    (["l4.TCP.destination_port"], {"destination.port", "network.transport"}),
    (["l4.TCP.flags"], {"network.transport"}),  # the body names the protocol, not the ports
    (["l4.UDP"], set()),  # another protocol's object: nothing of this TCP flow
    (["interface"], {"network.interface.name"}),
    (["interface.index"], set()),
    (["source.namespace", "destination.pod_name"], {"source.k8s.namespace.name", "destination.k8s.pod.name"}),
    (["source.workloads"], {"source.k8s.deployment.name"}),
    (["source.workloads.name"], set()),  # the attribute says the kind too
    (["source.workloads.name", "source.workloads.kind"], {"source.k8s.deployment.name"}),
    (["destination.labels"], {"destination.k8s.pod.labels.app", "destination.k8s.namespace.labels.team"}),
    (["source"], {f"source.{k}" for k in (*SIDE, "k8s.deployment.name")}),
])
def test_field_mask_governs_the_otlp_attributes(paths: list[str], kept: set[str]) -> None:
    attributes, body = encoded_attributes(paths, _named_flow())
    assert set(attributes) == kept
    full, _ = encoded_attributes([], _named_flow())
    assert all(attributes[k] == full[k] for k in kept)  # kept ones unchanged
    # The body is the masked object (an empty map is OTLP's empty value).
    assert (body or {}) == any_uuid(FlowLogFilter(FlowLogFilterConfig(field_mask=paths)).mask(hubble.flow_json(_named_flow()))) if "uuid" in (body or {}) else (body or {}) == FlowLogFilter(FlowLogFilterConfig(field_mask=paths)).mask(hubble.flow_json(_named_flow()))


def test_attribute_rules_follow_the_flows_protocol() -> None:
    udp = replace(sample_flows()["F9"])  # UDP 5000 -> 6000, IPv6
    assert set(encoded_attributes(["l4.UDP.source_port"], udp)[0]) == {"source.port", "network.transport"}
    assert set(encoded_attributes(["l4.TCP"], udp)[0]) == set()
    icmp = sample_flows()["F7"]
    assert encoded_attributes(["l4.ICMPv4"], icmp)[0] == {"network.transport": "icmp"}


def test_lost_events_records_are_not_masked() -> None:
    mask = FlowLogFilter(FlowLogFilterConfig(field_mask=["time"])).mask
    [(payload, _)] = list(OtlpEncoder({}, 10, "map", mask).logs([lost()], 0))
    [record] = ExportLogsServiceRequest.FromString(payload).resource_logs[0].scope_logs[0].log_records
    assert {kv.key for kv in record.attributes} == {"flowtel.lost_events.source"}


def test_masked_attributes_through_the_otlp_exporter_to_a_real_receiver() -> None:
    server = GrpcOtlpServer().start()
    try:
        exporter = OtlpGrpcExporter(settings("otlp"), OtlpGrpcConfig.model_validate({
            "endpoint": server.endpoint, "tls": {"insecure": True}, "timeout": "2s",
            "field_mask": ["time", "verdict", "IP.destination", "l4.TCP.destination_port", "destination.pod_name",
                           "destination.namespace"]}))
        exporter.start()
        try:
            exporter.consume([_named_flow(), lost()])
            exporter.flush()
        finally:
            exporter.shutdown()
        [(_, flow_record), (_, lost_record)] = server.recorder.log_records()
    finally:
        server.stop()
    assert {kv.key: any_to_python(kv.value) for kv in flow_record.attributes} == {
        "destination.address": "10.0.0.2", "destination.port": 8080, "network.transport": "tcp",
        "destination.k8s.namespace.name": "shop", "destination.k8s.pod.name": "payments-0"}
    assert any_to_python(flow_record.body) == {
        "time": "2024-11-26T11:45:46Z", "verdict": "FORWARDED", "IP": {"destination": "10.0.0.2"},
        "l4": {"TCP": {"destination_port": 8080}}, "destination": {"namespace": "shop", "pod_name": "payments-0"}}
    assert flow_record.event_name == "flowtel.flow" and flow_record.severity_text == "INFO"
    assert [kv.key for kv in lost_record.attributes] == ["flowtel.lost_events.source"]
