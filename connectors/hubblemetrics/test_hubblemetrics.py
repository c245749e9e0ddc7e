"""Each family handler over the fixed flows of tests/flowsamples.py: names, label order and
values as reference/metric-compat.md gives them, the context options, expiry and the bound."""
from __future__ import annotations


import pytest
from pydantic import ValidationError

from connectors.hubblemetrics.config import HubbleMetricsConfig
from connectors.hubblemetrics.connector import HubbleMetricsConnector
from connectors.hubblemetrics.factory import FACTORY
from connectors.hubblemetrics.options import LABELS_CONTEXT, OptionError, parse_context, parse_metric, pod_short
from connectors.hubblemetrics.series import SeriesStore
from flowtel.component import CreateSettings, Kind, Telemetry
from flowtel.records import (
    DnsInfo, Endpoint, EventKind, Flow, LostEvents, MetricKind, MetricPoint, Record, TcpFlagCounts, TrafficDirection, Verdict,
    Workload, replace,
)
from tests.flowsamples import T0, lost, sample_flows


class Capture:
    def __init__(self) -> None:
        self.got: list[MetricPoint] = []

    def wants(self, signal: str) -> bool:
        return signal == "metrics"

    def consume(self, batch: list[Record]) -> None:
        self.got.extend(batch)  # type: ignore[arg-type]


def run(metrics: list[str], records: list[Record], **cfg: object) -> list[MetricPoint]:
    cfg.setdefault("version_info", False)  # the families' points only; its own test below
    capture = Capture()
    conn = HubbleMetricsConnector(CreateSettings("hubblemetrics", "node-1", Telemetry()),
                                  HubbleMetricsConfig(metrics=metrics, **cfg), capture)  # type: ignore[arg-type]
    conn.consume(records)
    conn.shutdown()
    return capture.got


def series(points: list[MetricPoint], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Label items in emitted order (so a test sees the order) -> value."""
    return {tuple(p.attributes.items()): p.value for p in points if p.name == name}


def test_metric_string_grammar() -> None:
    spec = parse_metric("dns:query;ignoreAAAA;sourceContext=pod|ip;destinationContext=pod")
    assert spec.name == "dns"
    assert spec.options == {"query": "", "ignoreAAAA": "", "sourceContext": "pod|ip", "destinationContext": "pod"}
    assert parse_metric("flow").options == {}
    with pytest.raises(OptionError):
        parse_metric("dns:query;query")


@pytest.mark.parametrize("bad", ["nosuch", "flow:sourceContext=planet", "drop:frobnicate",
                                 "flow:labelsContext=source_pod,colour"])
def test_bad_metric_strings_are_config_errors(bad: str) -> None:
    with pytest.raises(ValidationError, match="hubble|unknown|not one of|metric"):
        HubbleMetricsConfig(metrics=[bad])


def test_the_same_family_twice_is_an_error() -> None:
    with pytest.raises(ValidationError, match="already defined"):
        HubbleMetricsConfig(metrics=["flow", "flow:sourceContext=pod"])


def test_flow_counts_packets_with_hubble_labels() -> None:
    f = sample_flows()
    got = series(run(["flow"], [f["F1"], f["F2"], f["F3"], f["F4"], f["F5"], f["F9"]]),
                 "hubble_flows_processed_total")
    assert got == {
        (("protocol", "TCP"), ("type", "Trace"), ("subtype", "from-endpoint"), ("verdict", "FORWARDED")): 1,
        (("protocol", "TCP"), ("type", "Trace"), ("subtype", "to-endpoint"), ("verdict", "FORWARDED")): 3,
        (("protocol", "TCP"), ("type", "Drop"), ("subtype", ""), ("verdict", "DROPPED")): 2,
        (("protocol", "DNS"), ("type", "L7"), ("subtype", "DNS"), ("verdict", "FORWARDED")): 2,
        (("protocol", "UDP"), ("type", "Trace"), ("subtype", ""), ("verdict", "FORWARDED")): 4,
    }


def test_tcp_event_and_unanswered_records_are_not_counted_again() -> None:
    f = sample_flows()
    event = replace(f["F1"], kind=EventKind.TCP_RETRANSMIT, verdict=Verdict.TRACED)
    unanswered = replace(f["F4"], kind=EventKind.DNS_UNANSWERED, verdict=Verdict.ERROR, is_reply=None)
    points = run(["flow", "tcp", "dns"], [event, unanswered])
    assert points == []


def test_label_order_labels_context_then_source_then_destination_then_own() -> None:
    f = sample_flows()
    points = run(["drop:labelsContext=traffic_direction,source_namespace,source_pod;"
                  "destinationContext=workload-name;sourceContext=pod"], [f["F3"]])
    [p] = points
    assert list(p.attributes.items()) == [
        ("source_pod", "client-1"), ("source_namespace", "default"), ("traffic_direction", "egress"),
        ("source", "default/client-1"), ("destination", "frontend"),
        # Cilium's DropReason on the wire: NETFILTER_DROP has no equivalent in Cilium's enum.
        ("reason", "DROP_REASON_UNKNOWN"), ("protocol", "TCP")]
    assert (p.name, p.value, p.kind) == ("hubble_drop_total", 2, MetricKind.SUM)


@pytest.mark.parametrize("context, expected", [
    ("pod", "shop/frontend-7c9d"),
    ("namespace", "shop"),
    ("ip", "10.0.0.1"),
    ("workload", "shop/frontend"),
    ("workload-name", "frontend"),
    ("app", "frontend"),
    ("identity", "k8s:app=frontend,k8s:io.kubernetes.pod.namespace=shop"),
    ("dns|ip", "10.0.0.1"),  # no names: the first non-empty wins
    ("reserved-identity", ""),
])
def test_source_contexts(context: str, expected: str) -> None:
    [p] = run([f"flow:sourceContext={context}"], [sample_flows()["F1"]])
    assert p.attributes["source"] == expected
    assert list(p.attributes)[0] == "source"


def test_destination_dns_context_and_pod_short() -> None:
    [p] = run(["flow:destinationContext=dns|ip"], [sample_flows()["F6"]])
    assert p.attributes["destination"] == "www.example.com"
    assert pod_short("frontend-7c9d8f6b5d-x2k4q") == "frontend"
    assert pod_short("payments-0") == "payments"  # Hubble's meaning: one trailing part goes too
    assert pod_short("coredns-abcde") == "coredns"


def test_tcp_counts_flag_packets_not_the_union() -> None:
    f1 = replace(sample_flows()["F1"], tcp_flag_counts=TcpFlagCounts(syn=3, fin=2, rst=1))
    f2 = sample_flows()["F2"]  # no counts: the union SYN|ACK, once
    f9 = replace(sample_flows()["F1"], ip_version=6, tcp_flag_counts=TcpFlagCounts(syn=1))
    got = series(run(["tcp:sourceContext=pod;destinationContext=pod"], [f1, f2, f9, sample_flows()["F3"]]),
                 "hubble_tcp_flags_total")
    fp, pf = (("source", "shop/frontend-7c9d"), ("destination", "shop/payments-0")), \
        (("source", "shop/payments-0"), ("destination", "shop/frontend-7c9d"))
    assert got == {
        (*fp, ("flag", "SYN"), ("family", "IPv4")): 3,
        (*fp, ("flag", "FIN"), ("family", "IPv4")): 2,
        (*fp, ("flag", "RST"), ("family", "IPv4")): 1,
        (*pf, ("flag", "SYN-ACK"), ("family", "IPv4")): 1,
        (*fp, ("flag", "SYN"), ("family", "IPv6")): 1,
    }  # F3 was dropped: not counted


def dns_response(rcode: int, qtypes: list[str], ips: list[str], rrtypes: list[str]) -> Flow:
    return replace(sample_flows()["F5"], l7=DnsInfo(query="x.example.", qtypes=tuple(qtypes), rcode=rcode,
                                                   ips=tuple(ips), rrtypes=tuple(rrtypes)))


def test_dns_families_rcode_words_and_query_label() -> None:
    f = sample_flows()
    denied = replace(f["F4"], verdict=Verdict.DROPPED)
    records: list[Record] = [f["F4"], denied, f["F5"], dns_response(3, ["A"], [], []),
                             dns_response(0, ["AAAA"], ["::1", "::2"], ["AAAA", "AAAA"])]
    points = run(["dns:query;sourceContext=pod"], records)
    assert series(points, "hubble_dns_queries_total") == {
        (("source", "shop/frontend-7c9d"), ("rcode", ""), ("qtypes", "A"), ("ips_returned", "0"),
         ("query", "www.example.com.")): 1,
        (("source", "shop/frontend-7c9d"), ("rcode", "Policy denied"), ("qtypes", "A"), ("ips_returned", "0"),
         ("query", "www.example.com.")): 1,
    }
    coredns = ("source", "kube-system/coredns-abc")
    assert series(points, "hubble_dns_responses_total") == {
        (coredns, ("rcode", "No Error"), ("qtypes", "A"), ("ips_returned", "1"), ("query", "www.example.com.")): 1,
        (coredns, ("rcode", "Non-Existent Domain"), ("qtypes", "A"), ("ips_returned", "0"), ("query", "x.example.")): 1,
        (coredns, ("rcode", "No Error"), ("qtypes", "AAAA"), ("ips_returned", "2"), ("query", "x.example.")): 1,
    }
    assert series(points, "hubble_dns_response_types_total") == {
        (coredns, ("type", "A"), ("qtypes", "A"), ("query", "www.example.com.")): 1,
        (coredns, ("type", "AAAA"), ("qtypes", "AAAA"), ("query", "x.example.")): 2,
    }


def test_dns_ignore_aaaa_and_no_query_label() -> None:
    points = run(["dns:ignoreAAAA"], [dns_response(0, ["AAAA"], ["::1"], ["AAAA"]),
                                      dns_response(5, ["A", "AAAA"], [], [])])
    assert series(points, "hubble_dns_responses_total") == {
        (("rcode", "Query Refused"), ("qtypes", "A,AAAA"), ("ips_returned", "0")): 1}
    assert series(points, "hubble_dns_response_types_total") == {}


def test_lost_events_source_is_hubbles_value_and_flowtels_exact_one_beside_it() -> None:
    # Hubble's dashboards and alerts select on the lower-case LostEventSource names.
    records: list[Record] = [LostEvents(T0, source, n, "node-1") for source, n in (
        ("FLOW_MAP_FULL", 1), ("FQDN_DENIED_MAP_FULL", 2), ("QUEUE_FULL:otlp", 4), ("EXPORT_FAILED:otlp", 8),
        ("HUBBLE_RING_BUFFER", 16))]
    points = run(["lost-events"], records)
    assert series(points, "hubble_lost_events_total") == {
        (("source", "perf_event_ring_buffer"),): 3, (("source", "observer_events_queue"),): 12,
        (("source", "hubble_ring_buffer"),): 16}
    assert series(points, "flowtel_lost_events_total") == {
        (("source", "FLOW_MAP_FULL"),): 1, (("source", "FQDN_DENIED_MAP_FULL"),): 2, (("source", "QUEUE_FULL:otlp"),): 4,
        (("source", "EXPORT_FAILED:otlp"),): 8, (("source", "HUBBLE_RING_BUFFER"),): 16}


def test_lost_events_port_distribution_icmp_flows_to_world() -> None:
    f = sample_flows()
    points = run(["lost-events", "port-distribution", "icmp", "flows-to-world:port"],
                 [lost(), lost(), *f.values()])
    # Hubble's label value (its LostEventSource, lower case), flowtel's exact source beside it.
    assert series(points, "hubble_lost_events_total") == {(("source", "perf_event_ring_buffer"),): 6}
    assert series(points, "flowtel_lost_events_total") == {(("source", lost().source),): 6}
    assert series(points, "hubble_port_distribution_total") == {
        (("protocol", "TCP"), ("port", "8080")): 1,   # F1; F2 is a reply, F3 dropped
        (("protocol", "TCP"), ("port", "443")): 10,
        (("protocol", "UDP"), ("port", "6000")): 4,
    }
    assert series(points, "hubble_icmp_total") == {(("family", "IPv4"), ("type", "EchoRequest")): 1}
    assert series(points, "hubble_flows_to_world_total") == {
        (("protocol", "TCP"), ("verdict", "FORWARDED"), ("port", "443")): 10}


def test_cumulative_across_flushes_and_timer_emits_without_batches() -> None:
    capture = Capture()
    conn = HubbleMetricsConnector(CreateSettings("h", "n", Telemetry()),
                                  HubbleMetricsConfig(metrics=["drop"], interval="50ms", version_info=False), capture)
    conn.start()
    conn.consume([sample_flows()["F3"]])
    conn.consume([sample_flows()["F3"]])
    import time
    deadline = time.monotonic() + 5
    while len(capture.got) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    conn.shutdown()
    values = [p.value for p in capture.got]
    assert len(values) >= 2 and set(values) == {4}  # re-sent each interval, never reset


def test_series_expire_when_idle() -> None:
    store = SeriesStore(max_series=10, expiry_s=60)
    store.add("m", ("a",), 1, now=100.0)
    store.add("m", ("b",), 1, now=100.0)
    store.add("m", ("a",), 1, now=150.0)
    assert store.expire(now=159.0) == 0
    assert store.expire(now=161.0) == 1
    assert store.items() == [("m", ("a",), 2)]


def test_max_series_bounds_growth_and_counts_overflow() -> None:
    f = sample_flows()
    telemetry = Telemetry()
    capture = Capture()
    conn = HubbleMetricsConnector(CreateSettings("hubblemetrics", "n", telemetry),
                                  HubbleMetricsConfig(metrics=["port-distribution"], max_series=2,
                                                      version_info=False), capture)
    conn.consume([replace(f["F1"], dst_port=port) for port in range(1000, 1010)])
    conn.consume([f["F1"]])  # an existing series still counts
    conn.flush()
    assert len(capture.got) == 2
    assert telemetry.snapshot()[("hubblemetrics", "series_overflow")] == 9


def test_factory_and_config_defaults() -> None:
    cfg = HubbleMetricsConfig.model_validate({"interval": "30s", "series_expiry": "1m"})
    assert (cfg.interval, cfg.series_expiry, cfg.max_series) == (30.0, 60.0, 50_000)
    assert FACTORY.kind is Kind.CONNECTOR and FACTORY.type == "hubblemetrics"


# --- Hubble's option grammar, case by case (cilium pkg/hubble/metrics/api/context_test.go,
# written here as our own table: options, a flow's parts, the context label values) ---------

def ep(namespace: str = "", pod: str = "", labels: tuple[str, ...] = (), workload: str = "") -> Endpoint:
    return Endpoint(namespace=namespace, pod_name=pod, labels=list(labels),
                    workloads=[Workload(workload, "Deployment")] if workload else [])


def flow_of(src: Endpoint | None = None, dst: Endpoint | None = None, *, src_ip: str = "", dst_ip: str = "",
            src_names: tuple[str, ...] = (), dst_names: tuple[str, ...] = (),
            direction: TrafficDirection = TrafficDirection.UNKNOWN) -> Flow:
    return Flow(time_ns=0, node_name="n", verdict=Verdict.FORWARDED, ip_version=4, src_ip=src_ip, dst_ip=dst_ip,
                protocol=6, src_port=1, dst_port=2, source=src, destination=dst, source_names=list(src_names),
                destination_names=list(dst_names), traffic_direction=direction)


E, I, U = TrafficDirection.EGRESS, TrafficDirection.INGRESS, TrafficDirection.UNKNOWN
HUBBLE_CONTEXT_CASES = [
    # (options, flow, label names, label values)
    ({"sourceContext": "namespace"}, flow_of(ep("foo")), ("source",), ("foo",)),
    ({"destinationContext": "namespace"}, flow_of(None, ep("foo")), ("destination",), ("foo",)),
    ({"sourceContext": "namespace", "destinationContext": "identity"},
     flow_of(ep("foo"), ep(labels=("a", "b"))), ("source", "destination"), ("foo", "a,b")),
    ({"sourceContext": "pod"}, flow_of(ep("foo", "foo")), ("source",), ("foo/foo",)),
    ({"destinationContext": "pod"}, flow_of(None, ep("foo", "bar")), ("destination",), ("foo/bar",)),
    ({"sourceContext": "pod-short"}, flow_of(ep("foo", "foo-123")), ("source",), ("foo/foo",)),
    ({"destinationContext": "pod-short"}, flow_of(None, ep("foo", "bar-bar-123-123")), ("destination",),
     ("foo/bar-bar",)),
    ({"sourceContext": "pod-name"}, flow_of(ep("foo", "foo-123")), ("source",), ("foo-123",)),
    ({"destinationContext": "pod-name"}, flow_of(None, ep("foo", "bar-123")), ("destination",), ("bar-123",)),
    ({"sourceContext": "dns"}, flow_of(src_names=("foo", "bar")), ("source",), ("foo,bar",)),
    ({"destinationContext": "dns"}, flow_of(dst_names=("bar",)), ("destination",), ("bar",)),
    ({"sourceContext": "ip"}, flow_of(src_ip="1.1.1.1"), ("source",), ("1.1.1.1",)),
    ({"destinationContext": "ip"}, flow_of(dst_ip="10.0.0.2"), ("destination",), ("10.0.0.2",)),
    # The direction's own option takes precedence; other directions use the plain one.
    ({"sourceContext": "pod-short", "sourceEgressContext": "pod"}, flow_of(ep("foo", "foo-123"), direction=E),
     ("source",), ("foo/foo-123",)),
    ({"sourceContext": "pod-short", "sourceEgressContext": "pod"}, flow_of(ep("foo", "foo-123"), direction=I),
     ("source",), ("foo/foo",)),
    ({"sourceContext": "pod-short", "sourceEgressContext": "pod", "sourceIngressContext": "pod"},
     flow_of(ep("foo", "foo-123"), direction=U), ("source",), ("foo/foo",)),
    ({"destinationContext": "pod-short", "destinationIngressContext": "pod"},
     flow_of(None, ep("foo", "bar-bar-123-123"), direction=E), ("destination",), ("foo/bar-bar",)),
    ({"destinationContext": "pod-short", "destinationIngressContext": "pod"},
     flow_of(None, ep("foo", "bar-bar-123-123"), direction=I), ("destination",), ("foo/bar-bar-123-123",)),
    ({"destinationContext": "pod-short", "destinationEgressContext": "pod", "destinationIngressContext": "pod"},
     flow_of(None, ep("foo", "bar-bar-123-123"), direction=U), ("destination",), ("foo/bar-bar",)),
    # Only direction options (Retina's Helm default): the label exists, empty on other directions.
    # (Cilium's context_test of the release we read expects no label at all for the last case;
    # flowtel keeps the label, as Retina's e2e tests and the ACNS dashboards need: README.)
    ({"sourceEgressContext": "pod", "destinationIngressContext": "pod"},
     flow_of(ep("a", "client"), ep("b", "server"), direction=E), ("source", "destination"), ("a/client", "")),
    ({"sourceEgressContext": "pod", "destinationIngressContext": "pod"},
     flow_of(ep("a", "client"), ep("b", "server"), direction=I), ("source", "destination"), ("", "b/server")),
    ({"destinationEgressContext": "pod", "destinationIngressContext": "pod"},
     flow_of(None, ep("foo", "bar"), direction=U), ("destination",), ("",)),
    # Chains: the first non-empty wins.
    ({"sourceContext": "namespace|dns", "destinationContext": "identity|pod-short|ip"},
     flow_of(ep("foo"), ep("bar", "foo-123"), dst_ip="10.0.0.2", src_names=("cilium.io",)),
     ("source", "destination"), ("foo", "bar/foo")),
    ({"sourceContext": "namespace|dns", "destinationContext": "identity|pod-short|ip"},
     flow_of(None, ep("bar", "foo-123", ("a", "b")), dst_ip="10.0.0.2", src_names=("cilium.io",)),
     ("source", "destination"), ("cilium.io", "a,b")),
    ({"sourceContext": "namespace|dns", "destinationContext": "identity|pod-short|ip"},
     flow_of(dst_ip="10.0.0.2"), ("source", "destination"), ("", "10.0.0.2")),
    # reserved-identity: kube-apiserver wins, else the first reserved label.
    ({"sourceContext": "reserved-identity", "destinationContext": "reserved-identity"},
     flow_of(ep(labels=("a", "b")), ep(labels=("c", "d"))), ("source", "destination"), ("", "")),
    ({"sourceContext": "reserved-identity", "destinationContext": "reserved-identity"},
     flow_of(ep(labels=("reserved:world", "reserved:kube-apiserver", "cidr:1.2.3.4/32")),
             ep(labels=("reserved:world", "cidr:1.2.3.4/32"))),
     ("source", "destination"), ("reserved:kube-apiserver", "reserved:world")),
    ({"sourceContext": "reserved-identity", "destinationContext": "reserved-identity"},
     flow_of(ep(labels=("a", "b", "reserved:host")), ep(labels=("c", "d", "reserved:remote-node"))),
     ("source", "destination"), ("reserved:host", "reserved:remote-node")),
    ({"sourceContext": "workload-name", "destinationContext": "workload-name"},
     flow_of(ep("foo-ns", "foo-deploy-pod"), ep("bar-ns", "bar-deploy-pod")), ("source", "destination"), ("", "")),
    ({"sourceContext": "workload-name", "destinationContext": "workload-name"},
     flow_of(ep("foo-ns", "p", workload="foo-deploy"), ep("bar-ns", "q", workload="bar-deploy")),
     ("source", "destination"), ("foo-deploy", "bar-deploy")),
    ({"sourceContext": "app", "destinationContext": "app"},
     flow_of(ep("foo-ns", "p", ("k8s:app=fooapp",)), ep("bar-ns", "q", ("k8s:app=barapp",))),
     ("source", "destination"), ("fooapp", "barapp")),
    # app: the first of the endpoint's labels that is an app label, Kubernetes ones only.
    ({"sourceContext": "app"}, flow_of(ep(labels=("k8s:app=first", "k8s:app.kubernetes.io/name=second"))),
     ("source",), ("first",)),
    ({"sourceContext": "app"}, flow_of(ep(labels=("container:app=x", "k8s:k8s-app=", "k8s:k8s-app=dns"))),
     ("source",), ("dns",)),
    # Keys and identifiers are case-insensitive, as Hubble lower-cases them.
    ({"SourceContext": "POD"}, flow_of(ep("foo", "foo")), ("source",), ("foo/foo",)),
]


@pytest.mark.parametrize("options, flow, names, values", HUBBLE_CONTEXT_CASES)
def test_hubble_context_cases(options: dict[str, str], flow: Flow, names: tuple[str, ...],
                              values: tuple[str, ...]) -> None:
    rest = dict(options)
    ctx = parse_context(rest, "flow")
    assert rest == {}
    assert ctx.label_names == names
    assert ctx.values(flow) == values


def test_all_labels_context_in_hubble_order_and_empty_flow() -> None:
    ctx = parse_context({"labelsContext": ",".join(reversed(LABELS_CONTEXT))}, "flow")
    assert ctx.label_names == LABELS_CONTEXT
    src = Endpoint(namespace="foo-ns", pod_name="foo-deploy-pod", labels=["k8s:app=fooapp"],
                   workloads=[Workload("foo-deploy", "Deployment")])
    dst = Endpoint(namespace="bar-ns", pod_name="bar-deploy-pod", labels=["k8s:app=barapp"],
                   workloads=[Workload("bar-deploy", "Deployment")])
    f = flow_of(src, dst, src_ip="1.2.3.4", dst_ip="5.6.7.8", direction=I)
    assert ctx.values(f) == ("1.2.3.4", "foo-deploy-pod", "foo-ns", "foo-deploy", "Deployment", "fooapp",
                             "5.6.7.8", "bar-deploy-pod", "bar-ns", "bar-deploy", "Deployment", "barapp", "ingress")
    assert ctx.values(flow_of()) == ("",) * 12 + ("unknown",)


@pytest.mark.parametrize("name, short", [("pod-x-123-1123123", "pod-x"), ("pod-0000", "pod"),
                                         ("pod-pod-pod-1-1", "pod-pod-pod"), ("foo-123", "foo"),
                                         ("nodash", "nodash"), ("-abc", "-abc"), ("Foo-Bar", "Foo-Bar"),
                                         ("a-B-1", "a-B")])
def test_pod_short_as_hubble(name: str, short: str) -> None:
    assert pod_short(name) == short


@pytest.mark.parametrize("bad, named", [
    ("flow:sourceContext=invalid", "invalid"),
    ("flow:destinationContext=namespace|invalid", "invalid"),
    ("flow:sourceEgressContext=planet", "planet"),
    ("flow:labelsContext=non_existent_label", "non_existent_label"),
    ("flow:labelsContext=", "labelsContext ''"),
    ("flow:labelsContext=source_pod,,traffic_direction", "labelsContext ''"),
    ("dns:query;frobnicate", "frobnicate"),
    ("httpV2:exemplars=maybe", "exemplars"),
    ("drop:sourceContext=pod;sourcecontext=ip", "given twice"),
    ("http http", "already defined"),
    ("http httpV2", "cannot both"),
    ("dns:query; ignoreAAAA", "split at whitespace"),
])
def test_hubble_grammar_errors_name_the_culprit(bad: str, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        HubbleMetricsConfig(metrics=[bad])


# Retina's Helm default (deploy/hubble/manifests/controller/helm/retina/values.yaml,
# hubble.metrics.enabled) and Hubble's documented example (Cilium's
# Documentation/observability/metrics.rst, `--set hubble.metrics.enabled=...`).
RETINA_DEFAULT = ["flow:sourceEgressContext=pod;destinationIngressContext=pod",
                  "tcp:sourceEgressContext=pod;destinationIngressContext=pod",
                  "dns:query;sourceEgressContext=pod;destinationIngressContext=pod",
                  "drop:sourceEgressContext=pod;destinationIngressContext=pod"]
HUBBLE_EXAMPLE = ["dns:query;ignoreAAAA", "drop", "tcp", "flow", "port-distribution", "icmp", "http"]


@pytest.mark.parametrize("metrics", [RETINA_DEFAULT, HUBBLE_EXAMPLE, [" ".join(RETINA_DEFAULT)],
                                     ["flow:sourceContext=pod|namespace;destinationContext=workload "
                                      "httpV2:exemplars=true;labelsContext=source_namespace,destination_namespace"],
                                     ["flows-to-world:syn-only;sourceEgressContext=pod;destinationContext=ip"]])
def test_retina_and_hubble_default_strings_are_accepted(metrics: list[str]) -> None:
    run(metrics, list(sample_flows().values()))


def test_retina_default_labels_each_pods_own_packets() -> None:
    f = sample_flows()
    got = run(RETINA_DEFAULT[:1], [f["F1"], f["F2"]])
    by_dir = {p.attributes["subtype"]: (p.attributes["source"], p.attributes["destination"]) for p in got}
    assert list(got[0].attributes)[:2] == ["source", "destination"]
    assert by_dir["from-endpoint"][1] == "" and by_dir["from-endpoint"][0].count("/") == 1
    assert by_dir["to-endpoint"][0] == "" and by_dir["to-endpoint"][1].count("/") == 1


def test_http_family_declares_nothing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", "flowtel.connector.hubblemetrics"):
        points = run(["http:sourceContext=pod", "flow"], [sample_flows()["F1"]])
    assert {p.name for p in points} == {"hubble_flows_processed_total"}
    assert "'http' has no series" in caplog.text


def test_cilium_version_series_for_the_dashboards_cluster_variable() -> None:
    points = run(["flow"], [sample_flows()["F1"]], version_info=True)
    [info] = [p for p in points if p.name == "cilium_version"]
    assert info.value == 1 and info.kind is MetricKind.GAUGE
    assert set(info.attributes) == {"version", "revision", "arch"}
    assert info.attributes["version"].startswith("flowtel-")
    # On by default; off, nothing but the families.
    assert HubbleMetricsConfig().version_info is True
    assert "cilium_version" not in {p.name for p in run(["flow"], [sample_flows()["F1"]])}


def test_a_batch_counts_what_its_records_count_one_by_one() -> None:
    # The families group a batch by their label keys and update each series once, with the
    # counts summed: the series and values must be exactly those of feeding the records one
    # at a time (Handler.process, the definition of each family), for every kind of record.
    from tests.contracts.test_wire_form import every_kind

    metrics = ["flow:sourceContext=pod|ip;destinationContext=pod|ip", "drop:sourceContext=pod",
               "tcp:sourceContext=pod|ip;destinationContext=pod|ip", "dns:query;sourceContext=pod",
               "icmp:sourceContext=pod|ip;destinationContext=pod|ip", "port-distribution", "lost-events",
               "flows-to-world:port;any-drop"]
    base = list(every_kind().values())
    records: list[Record] = []
    for i in range(6):  # repeats, so groups hold several records, with counts that differ
        for j, f in enumerate(base):
            records.append(replace(f, packets=f.packets + i * j, src_port=f.src_port + i % 2,
                                   tcp_flag_counts=TcpFlagCounts(i, j % 2, i % 3, 1) if f.protocol == 6 and i else
                                   f.tcp_flag_counts))
        records.append(replace(base[0], protocol=1, src_port=8, dst_port=0, packets=i + 1))
        for f in base[:4]:  # the same ends seen in the other direction, and as a reply
            records.append(replace(f, traffic_direction=TrafficDirection.INGRESS, is_reply=bool(i % 2)))
        records.append(LostEvents(T0, f"QUEUE_FULL:x{i % 2}", i + 1, "node-1"))

    def series(points: list[MetricPoint]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(p.name, tuple(sorted(p.attributes.items()))): p.value for p in points}

    batched = series(run(metrics, records))
    one_by_one_conn = HubbleMetricsConnector(CreateSettings("hubblemetrics", "node-1", Telemetry()),
                                             HubbleMetricsConfig(metrics=metrics, version_info=False), Capture())
    for h in one_by_one_conn.handlers:
        for r in records:
            if isinstance(r, Flow):
                h.process(r, one_by_one_conn.store.add)
            elif isinstance(r, LostEvents):
                h.process_lost(r, one_by_one_conn.store.add)
    single = series(one_by_one_conn.points())
    assert batched == single and len(batched) > 40
