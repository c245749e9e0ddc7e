"""Flow-log allow/deny filters and field mask (Hubble's exporter semantics) over tests/flowsamples."""
from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from exporters.common.flowlog_filter import FlowLogFilter, FlowLogFilterConfig
from flowtel import hubble
from exporters.file.factory import FACTORY
from flowtel.component import Kind
from flowtel.config import ConfigError, parse_config
from tests.flowsamples import lost, sample_flows


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
    assert selected(allow_list=[{"verdict": ["DROPPED"]}, {"destination_fqdn": ["*.example.com"]}]) == [
        "F3", "F4", "F5", "F6"]
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
    return flt.mask(hubble.flow_to_dict(sample_flows()[name]))


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
        "source": hubble.flow_to_dict(sample_flows()["F2"])["source"]}


def test_empty_mask_keeps_everything() -> None:
    flow = hubble.flow_to_dict(sample_flows()["F3"])
    assert FlowLogFilter(FlowLogFilterConfig()).mask(flow) == flow


@pytest.mark.parametrize(("raw", "loc", "fragment"), [
    ({"allow_list": [{"namespace": ["shop"]}]}, ("allow_list", 0), "source_pod: ['NS/']"),
    ({"allow_list": [{"verdict": ["DROPPED"]}, {"verdict": ["DROP"]}]}, ("allow_list", 1, "verdict"), "'DROP'"),
    ({"deny_list": [{"source_ip": ["10.0.0.300"]}]}, ("deny_list", 0, "source_ip"), "invalid IP address"),
    ({"deny_list": [{"destination_port": ["99999"]}]}, ("deny_list", 0, "destination_port"), "0-65535"),
    ({"deny_list": [{"dns_query": ["x"]}]}, ("deny_list", 0), "flowtel does not support"),
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
