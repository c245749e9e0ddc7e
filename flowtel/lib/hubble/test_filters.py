"""Hubble's filter semantics, case by case (tables after cilium pkg/hubble/filters tests),
and the bounds that keep a hostile filter cheap."""
from __future__ import annotations

import time

import pytest
from google.protobuf import json_format

from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.lib.hubble.filters import MAX_FILTERS, MAX_VALUES, FilterError, compile_filters
from flowtel.lib.hubble.flags import build_filters


def flow(**d: object) -> flow_pb2.Flow:
    return json_format.ParseDict(d, flow_pb2.Flow())


def ff(**d: object) -> flow_pb2.FlowFilter:
    return json_format.ParseDict(d, flow_pb2.FlowFilter())


def passes(f: flow_pb2.Flow, white: list[flow_pb2.FlowFilter] | None = None,
           black: list[flow_pb2.FlowFilter] | None = None) -> bool:
    return compile_filters(white or [], black or []).matches_flow(f)


WEB = flow(
    uuid="u-1", verdict="FORWARDED", node_name="node-a", node_labels=["kubernetes.io/os=linux"],
    IP={"source": "10.0.0.1", "destination": "192.168.1.7", "ipVersion": "IPv4"},
    l4={"TCP": {"source_port": 41000, "destination_port": 80, "flags": {"SYN": True, "ACK": True}}},
    source={"namespace": "shop", "pod_name": "web-7d9", "labels": ["k8s:app=web", "k8s:tier=front"],
            "identity": 1234, "workloads": [{"name": "web", "kind": "Deployment"}]},
    destination={"namespace": "kube-system", "pod_name": "coredns-1", "labels": ["k8s:k8s-app=kube-dns"]},
    destination_names=["api.example.com"], traffic_direction="EGRESS", is_reply=False,
    event_type={"type": 4, "sub_type": 5}, interface={"index": 7, "name": "veth1"},
    source_service={"namespace": "shop", "name": "web"},
)
DROP = flow(verdict="DROPPED", drop_reason_desc="POLICY_DENIED", event_type={"type": 1, "sub_type": 133},
            IP={"source": "fd00::1", "destination": "fd00::2", "ipVersion": "IPv6"},
            l4={"UDP": {"source_port": 5353, "destination_port": 53}}, node_name="node-b")
DNS = flow(l7={"type": "REQUEST", "dns": {"query": "api.example.com.", "qtypes": ["A"]}},
           event_type={"type": 129}, verdict="FORWARDED", is_reply=False)
ICMP = flow(l4={"ICMPv4": {"type": 8}}, IP={"source": "10.0.0.1", "destination": "10.0.0.9", "ipVersion": "IPv4"})

CASES = [
    # (filter JSON, flow, expected)
    ({"source_pod": ["shop/web"]}, WEB, True),
    ({"source_pod": ["shop/"]}, WEB, True),
    ({"source_pod": ["web"]}, WEB, False),  # a bare name is in "default"
    ({"source_pod": ["shop/db"]}, WEB, False),
    ({"destination_pod": ["kube-system/coredns"]}, WEB, True),
    ({"source_pod": ["shop/web"]}, DROP, False),  # no pod at all
    ({"source_service": ["shop/web"]}, WEB, True),
    ({"destination_service": ["shop/web"]}, WEB, False),
    ({"source_ip": ["10.0.0.1"]}, WEB, True),
    ({"source_ip": ["10.0.0.0/8"]}, WEB, True),
    ({"destination_ip": ["10.0.0.0/8"]}, WEB, False),
    ({"source_ip": ["fd00::0:1"]}, DROP, True),
    ({"source_port": ["41000"]}, WEB, True),
    ({"destination_port": ["80", "443"]}, WEB, True),
    ({"destination_port": ["53"]}, DROP, True),
    ({"destination_port": ["0"]}, ICMP, False),  # ICMP has no ports
    ({"protocol": ["tcp"]}, WEB, True),
    ({"protocol": ["UDP"]}, WEB, False),
    ({"protocol": ["icmp"]}, ICMP, True),
    ({"protocol": ["icmpv6"]}, ICMP, False),
    ({"protocol": ["dns"]}, DNS, True),
    ({"protocol": ["http"]}, DNS, False),
    ({"verdict": ["DROPPED"]}, DROP, True),
    ({"verdict": ["DROPPED"]}, WEB, False),
    ({"drop_reason_desc": ["POLICY_DENIED"]}, DROP, True),
    ({"drop_reason_desc": ["CT_MAP_INSERTION_FAILED"]}, DROP, False),
    ({"event_type": [{"type": 1}]}, DROP, True),
    ({"event_type": [{"type": 4, "match_sub_type": True, "sub_type": 0}]}, WEB, False),
    ({"event_type": [{"type": 4, "match_sub_type": True, "sub_type": 5}]}, WEB, True),
    ({"event_type": [{"type": 4, "sub_type": 0}]}, WEB, True),  # sub_type ignored without match_sub_type
    ({"event_type": [{"type": 129}]}, ICMP, False),  # no event_type
    ({"source_label": ["app=web"]}, WEB, True),
    ({"source_label": ["k8s:app in (web, api)", "app=nothing"]}, WEB, True),
    ({"source_label": ["app=web,tier!=front"]}, WEB, False),
    ({"destination_label": ["!k8s-app"]}, WEB, False),
    ({"node_labels": ["kubernetes.io/os=linux"]}, WEB, True),
    ({"destination_fqdn": ["*.example.com"]}, WEB, True),
    ({"destination_fqdn": ["API.example.com."]}, WEB, True),
    ({"destination_fqdn": ["example.com"]}, WEB, False),
    ({"source_fqdn": ["*.example.com"]}, WEB, False),
    ({"dns_query": [r"example\.com\.$"]}, DNS, True),
    ({"dns_query": ["^cilium"]}, DNS, False),
    ({"dns_query": ["example"]}, WEB, False),  # not a DNS flow
    ({"traffic_direction": ["EGRESS"]}, WEB, True),
    ({"traffic_direction": ["INGRESS"]}, WEB, False),
    ({"reply": [False]}, WEB, True),
    ({"reply": [True]}, WEB, False),
    ({"reply": [False]}, DROP, True),  # a drop of unknown direction counts as not a reply
    ({"reply": [True]}, DROP, False),
    ({"reply": [False]}, ICMP, False),  # unknown direction, not a drop: neither
    ({"node_name": ["node-a"]}, WEB, True),
    ({"node_name": ["default/node-*"]}, WEB, True),
    ({"node_name": ["other/node-a"]}, WEB, False),
    ({"node_name": ["node-b"]}, WEB, False),
    ({"source_identity": [1234]}, WEB, True),
    ({"destination_identity": [1234]}, WEB, False),
    ({"source_workload": [{"kind": "Deployment"}]}, WEB, True),
    ({"source_workload": [{"name": "web", "kind": "StatefulSet"}]}, WEB, False),
    ({"tcp_flags": [{"SYN": True}]}, WEB, True),
    ({"tcp_flags": [{"SYN": True, "FIN": True}]}, WEB, False),
    ({"tcp_flags": [{"RST": True}, {"ACK": True}]}, WEB, True),
    ({"ip_version": ["IPv6"]}, DROP, True),
    ({"ip_version": ["IPv6"]}, WEB, False),
    ({"uuid": ["u-1"]}, WEB, True),
    ({"interface": [{"name": "veth1"}]}, WEB, True),
    ({"interface": [{"index": 8}]}, WEB, False),
    ({"http_status_code": ["5+"]}, WEB, False),
    ({"encrypted": [False]}, WEB, True),
    ({"source_pod": ["shop/web"], "destination_port": ["80"]}, WEB, True),  # AND
    ({"source_pod": ["shop/web"], "destination_port": ["443"]}, WEB, False),
    ({}, WEB, True),  # an empty filter matches everything
]


@pytest.mark.parametrize("filt,f,expected", CASES, ids=[str(c[0]) for c in CASES])
def test_field_semantics(filt: dict, f: flow_pb2.Flow, expected: bool) -> None:
    assert passes(f, [ff(**filt)]) is expected


def test_lists_or_and_blacklist_wins() -> None:
    white = [ff(verdict=["DROPPED"]), ff(protocol=["tcp"])]
    assert passes(WEB, white) and passes(DROP, white) and not passes(ICMP, white)
    assert not passes(WEB, white, [ff(source_pod=["shop/"])])
    assert passes(DROP, None, [ff(source_pod=["shop/"])])


def test_lost_events_always_pass() -> None:
    resp = observer_pb2.GetFlowsResponse(lost_events=flow_pb2.LostEvent(num_events_lost=3))
    assert compile_filters([ff(verdict=["DROPPED"])], [ff()]).matches(resp)


INVALID = [
    ({"source_ip": ["10.0.0.300"]}, "invalid IP address"),
    ({"destination_ip": ["10.0.0.0/33"]}, "invalid CIDR"),
    ({"source_port": ["65536"]}, "invalid port"),
    ({"source_port": ["http"]}, "invalid port"),
    ({"protocol": ["quic"]}, "unknown protocol"),
    ({"source_pod": [""]}, "must be [namespace/][<name>]"),
    ({"source_fqdn": ["a(b"]}, "invalid FQDN"),
    ({"dns_query": ["(unclosed"]}, "invalid regular expression"),
    ({"dns_query": [r"(a)\1"]}, "invalid regular expression"),  # backreferences: not RE2
    ({"http_path": ["[z-a]"]}, "invalid regular expression"),
    ({"http_status_code": ["600"]}, "invalid status code"),
    ({"source_label": ["app in (a"]}, "invalid label selector"),
    ({"node_name": ["a/b/c"]}, "too many slashes"),
    ({"node_name": ["node$"]}, "invalid rune"),
    ({"experimental": {"cel_expression": ["true"]}}, "CEL filters are not supported"),
]


@pytest.mark.parametrize("filt,message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_filters_are_refused(filt: dict, message: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filters([ff(**filt)])
    assert message in str(info.value)
    assert str(info.value).startswith("whitelist[0].")


def test_bounds() -> None:
    with pytest.raises(FilterError, match="at most"):
        compile_filters([ff()] * (MAX_FILTERS + 1))
    with pytest.raises(FilterError, match="at most"):
        compile_filters([], [ff(source_pod=[f"ns/p{i}" for i in range(MAX_VALUES + 1)])])
    with pytest.raises(FilterError, match="characters"):
        compile_filters([ff(dns_query=["a" * 5000])])
    with pytest.raises(FilterError, match="characters"):
        compile_filters([ff(source_pod=["a" * 1025])])


def test_matching_is_linear_for_hostile_patterns() -> None:
    # Exponential for a backtracking engine: (a*)*b against a long run of a's.
    f = flow(l7={"dns": {"query": "a" * 1000}}, destination_names=["a" * 1000])
    filters = compile_filters([ff(dns_query=["^(a*)*b$", "(a|aa)+$x"]), ff(destination_fqdn=["*a*a*a*a*a*a*b"])])
    start = time.monotonic()
    for _ in range(100):
        assert not filters.matches_flow(f)
    assert time.monotonic() - start < 2.0


# --- hubble observe's flags ------------------------------------------------------------


def _json(filters: list[flow_pb2.FlowFilter]) -> list[dict]:
    return [json_format.MessageToDict(f) for f in filters]


def test_flags_either_end_and_shared() -> None:
    white, black = build_filters([("pod", "shop/web"), ("port", "80"), ("protocol", "tcp")])
    assert _json(white) == [
        {"sourcePod": ["shop/web"], "sourcePort": ["80"], "protocol": ["tcp"]},
        {"destinationPod": ["shop/web"], "destinationPort": ["80"], "protocol": ["tcp"]},
    ]
    assert black == []


def test_flags_namespace_and_not() -> None:
    white, black = build_filters([("namespace", "shop"), ("not", ""), ("verdict", "dropped"),
                                  ("type", "trace:to-endpoint")])
    # --not negates only the next flag: the type stays in the whitelist, on both ends.
    to_endpoint = [{"type": 4, "matchSubType": True}]
    assert _json(white) == [{"sourcePod": ["shop/"], "eventType": to_endpoint},
                            {"destinationPod": ["shop/"], "eventType": to_endpoint}]
    assert _json(black) == [{"verdict": ["DROPPED"]}]


@pytest.mark.parametrize("pairs,message", [
    ([("from-pod", "a"), ("namespace", "b")], "cannot be combined"),
    ([("not", ""), ("not", "")], "consecutive --not"),
    ([("ip", "nope")], "invalid IP address"),
    ([("verdict", "MAYBE")], "invalid verdict"),
    ([("type", "bogus")], "unable to parse type"),
    ([("frobnicate", "x")], "unknown filter"),
    ([("not", "")], "must be followed"),
])
def test_flag_errors(pairs: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(FilterError) as info:
        build_filters(pairs)
    assert message in str(info.value)


def test_to_fqdn_also_matches_lookups_through_a_hubble_native_twin() -> None:
    white, _ = build_filters([("to-fqdn", "*.example.com"), ("protocol", "udp")])
    assert _json(white) == [
        {"destinationFqdn": ["*.example.com"], "protocol": ["udp"]},
        {"protocol": ["udp"], "dnsQuery": ["(?i)^[-a-zA-Z0-9_.]*[.]example[.]com[.]?$"]},
    ]
    lookup = flow(l7={"dns": {"query": "API.Example.com."}}, l4={"UDP": {"destination_port": 53}})
    assert compile_filters(white).matches_flow(lookup)
    assert not compile_filters(white).matches_flow(flow(l7={"dns": {"query": "example.com."}}, l4={"UDP": {}}))
