"""`flowtel policy suggest` from Hubble flow fixtures: each rule kind, what is not egress,
verdicts, collapse, selection, determinism, the YAML emitter, the CRD shape and the DNS
proxy's parser, and the command line against a file and a real flows API."""
from __future__ import annotations

import ipaddress
import json
import random
import re
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from flowtel.lib import policy as proxy_policy
from extensions.hubble.config import HubbleConfig
from extensions.hubble.extension import HubbleExtension
from flowtel.lib.hubble import convert as hubble, printer, summary as _summary, timefmt
from flowtel.cli import main
from flowtel.component import CreateSettings, Telemetry
from flowtel.policysuggest import Options, Selection, SuggestError, suggest, to_json, to_yaml
from flowtel.policysuggest.render import scalar
from flowtel.policysuggest.derive import collapse_names
from flowtel.records import (
    TcpFlagCounts,
    replace,
    TCP_ACK,
    TCP_SYN,
    DnsInfo,
    Endpoint,
    Flow,
    EventKind,
    LostEvents,
    Record,
    TrafficDirection,
    Verdict,
    Workload,
)
from tests.flowsamples import T0, sample_flows

EGRESS, INGRESS, UNKNOWN = TrafficDirection.EGRESS, TrafficDirection.INGRESS, TrafficDirection.UNKNOWN


def pod(name: str, ns: str = "shop", labels: dict[str, str] | None = None, workload: str = "") -> Endpoint:
    hubble_labels = [f"k8s:{k}={v}" for k, v in (labels or {}).items()]
    hubble_labels += [f"k8s:io.kubernetes.pod.namespace={ns}", "k8s:io.cilium.k8s.policy.cluster=default",
                      "k8s:io.cilium.k8s.policy.serviceaccount=default",
                      f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={ns}"]
    kind, _, wname = workload.rpartition("/")
    return Endpoint(identity=300, namespace=ns, pod_name=name, labels=tuple(sorted(hubble_labels)),
                    workloads=(Workload(wname, kind or "Deployment"),) if workload else ())


WORLD = Endpoint(identity=2, labels=("reserved:world",))
WEB1 = pod("web-7c9d-aaaaa", labels={"app": "web", "version": "v1", "pod-template-hash": "7c9d"}, workload="web")
WEB2 = pod("web-7c9d-bbbbb", labels={"app": "web", "version": "v2", "pod-template-hash": "7c9d"}, workload="web")
DB = pod("db-0", labels={"app": "db"}, workload="StatefulSet/db")
DNS = pod("coredns-5d78c9-q7w2e", "kube-system", {"k8s-app": "kube-dns"}, "coredns")
IP_WEB1, IP_WEB2, IP_DB, IP_DNS = "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.9.9"
WEB = Selection("shop", workload="web")


def tcp(src: Endpoint, src_ip: str, dst: Endpoint | None, dst_ip: str, dport: int, t: int = 1, *,
        sport: int = 40000, verdict: Verdict = Verdict.FORWARDED, direction: TrafficDirection = EGRESS,
        is_reply: bool | None = False, names: tuple[str, ...] = (), protocol: int = 6, **kw: Any) -> Flow:
    return Flow(time_ns=T0 + t * 1_000_000_000, node_name="node-1", verdict=verdict, ip_version=6 if ":" in dst_ip else 4,
                src_ip=src_ip, dst_ip=dst_ip, protocol=protocol, src_port=sport, dst_port=dport,
                traffic_direction=direction, is_reply=is_reply, tcp_flags=TCP_SYN | TCP_ACK, packets=4, bytes=300,
                source=src, destination=dst or WORLD, destination_names=tuple(names), **kw)


def dns_query(client: Endpoint, client_ip: str, name: str, t: int = 0, *, server: Endpoint | None = DNS,
              server_ip: str = IP_DNS, protocol: int = 17, verdict: Verdict = Verdict.FORWARDED) -> Flow:
    return Flow(time_ns=T0 + t * 1_000_000_000, node_name="node-1", verdict=verdict, ip_version=4, src_ip=client_ip,
                dst_ip=server_ip, protocol=protocol, src_port=50000, dst_port=53, kind=EventKind.DNS_REQUEST,
                is_reply=False, traffic_direction=EGRESS, l7=DnsInfo(query=name + ".", qtypes=("A",)),
                source=client, destination=server or WORLD)


def dns_answer(client: Endpoint, client_ip: str, name: str, ips: list[str], t: int = 0, *, rcode: int = 0,
               server: Endpoint | None = DNS, server_ip: str = IP_DNS, protocol: int = 17) -> Flow:
    return Flow(time_ns=T0 + t * 1_000_000_000, node_name="node-1", verdict=Verdict.FORWARDED, ip_version=4,
                src_ip=server_ip, dst_ip=client_ip, protocol=protocol, src_port=53, dst_port=50000,
                kind=EventKind.DNS_RESPONSE, is_reply=True, traffic_direction=INGRESS,
                l7=DnsInfo(query=name + ".", qtypes=("A",), ips=tuple(ips), rcode=rcode, ttl=30),
                source=server or WORLD, destination=client)


def resolve(name: str, ips: list[str], t: int = 0, client: Endpoint = WEB1, client_ip: str = IP_WEB1) -> list[Flow]:
    return [dns_query(client, client_ip, name, t), dns_answer(client, client_ip, name, ips, t)]


def egress(records: list[Record], selection: Selection = WEB, **options: Any) -> list[dict[str, Any]]:
    return suggest(records, selection, Options(**options)).policy["spec"]["egress"]


def ports(*pairs: tuple[int, str]) -> list[dict[str, Any]]:
    return [{"ports": [{"port": str(p), "protocol": proto} for p, proto in pairs]}]


DNS_SELECTOR = {"matchLabels": {"io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}


def dns_rule(*names: str, selector: dict[str, Any] = DNS_SELECTOR, protocols: tuple[str, ...] = ("UDP",),
             patterns: tuple[str, ...] = ()) -> dict[str, Any]:
    entries = sorted([{"matchName": n} for n in names] + [{"matchPattern": p} for p in patterns],
                     key=lambda e: next(iter(e.values())).lstrip("*."))
    return {"toEndpoints": [selector],
            "toPorts": [{"ports": [{"port": "53", "protocol": p} for p in protocols], "rules": {"dns": entries}}]}


# -- each rule kind ----------------------------------------------------------------------

def test_sample_flows_give_dns_fqdn_and_endpoint_rules_and_the_proxy_accepts_them() -> None:
    s = suggest(list(sample_flows().values()), Selection("shop", workload="frontend"), Options())
    assert s.policy["metadata"]["name"] == "frontend" and s.policy["metadata"]["namespace"] == "shop"
    assert s.policy["spec"]["endpointSelector"] == {"matchLabels": {"app": "frontend"}}
    assert s.policy["spec"]["egress"] == [
        dns_rule("www.example.com"),
        {"toFQDNs": [{"matchName": "www.example.com"}], "toPorts": ports((443, "TCP"))},
        {"toEndpoints": [{"matchLabels": {"app": "payments", "io.kubernetes.pod.namespace": "shop", "tier": "backend"}}],
         "toPorts": ports((8080, "TCP"))},
    ]
    parsed = proxy_policy.parse_policy(yaml.safe_load(to_yaml(s)), "suggested")
    frontend = proxy_policy.Pod("frontend-7c9d", "shop", {"app": "frontend"}, ("10.0.0.1",))
    payments = proxy_policy.Pod("payments-0", "shop", {"app": "payments", "tier": "backend"}, ("10.0.0.2",))
    coredns = proxy_policy.Pod("coredns-abc", "kube-system", {"k8s-app": "kube-dns"}, ("10.0.9.9",))
    policies = proxy_policy.PolicySet([parsed], [frontend, payments, coredns])
    assert policies.is_policed(frontend) and not policies.is_policed(payments)
    assert policies.dns_allowed(frontend, "www.example.com.") and not policies.dns_allowed(frontend, "example.com")
    assert policies.fqdn_l4(frontend, "www.example.com") == proxy_policy.L4(False, (proxy_policy.PortRange(443, 443, 6),))
    assert policies.fqdn_l4(frontend, "other.example.com") is None
    cidrs = {str(e.network): e.l4 for e in policies.cidr_entries(frontend)}
    assert cidrs["10.0.0.2/32"] == proxy_policy.L4(False, (proxy_policy.PortRange(8080, 8080, 6),))
    assert cidrs["10.0.9.9/32"] == proxy_policy.L4(False, (proxy_policy.PortRange(53, 53, 17),))


def test_external_address_by_name_without_name_and_ipv6() -> None:
    flows = [*resolve("api.example.com", ["93.184.216.34"]),
             tcp(WEB1, IP_WEB1, None, "93.184.216.34", 443),
             tcp(WEB1, IP_WEB1, None, "192.0.2.7", 443),  # never in an answer
             tcp(WEB1, IP_WEB1, None, "2001:db8::7", 443),
             tcp(WEB1, IP_WEB1, None, "198.51.100.1", 8443, names=("named.by.processor",))]
    assert egress(flows) == [
        dns_rule("api.example.com"),
        {"toFQDNs": [{"matchName": "api.example.com"}], "toPorts": ports((443, "TCP"))},
        {"toFQDNs": [{"matchName": "named.by.processor"}], "toPorts": ports((8443, "TCP"))},
        {"toCIDR": ["192.0.2.7/32", "2001:db8::7/128"], "toPorts": ports((443, "TCP"))},
    ]


def test_ipv6_answers_match_whatever_the_spelling_and_unanswered_queries_count_once() -> None:
    unanswered = replace(dns_query(WEB1, IP_WEB1, "slow.example.com", t=3), kind=EventKind.DNS_UNANSWERED,
                         verdict=Verdict.ERROR, is_reply=None)
    flows = [*resolve("v6.example.com", ["2001:DB8:0::10"]), tcp(WEB1, IP_WEB1, None, "2001:db8::10", 443),
             dns_query(WEB1, IP_WEB1, "slow.example.com", t=1), unanswered]
    s = suggest(flows, WEB)
    assert s.policy["spec"]["egress"][1] == {"toFQDNs": [{"matchName": "v6.example.com"}], "toPorts": ports((443, "TCP"))}
    assert "# slow.example.com: 1 query (unanswered)" in to_yaml(s)


def test_an_answer_drained_after_the_connection_still_names_it() -> None:
    # Aggregated flows are drained on an interval; the answer can come later in the input.
    flows = [tcp(WEB1, IP_WEB1, None, "93.184.216.34", 443, t=1), *resolve("api.example.com", ["93.184.216.34"], t=2)]
    assert egress(flows)[1] == {"toFQDNs": [{"matchName": "api.example.com"}], "toPorts": ports((443, "TCP"))}


def test_every_name_that_answered_with_the_address_is_allowed() -> None:
    flows = [*resolve("a.example.com", ["93.184.216.34"]), *resolve("b.example.net", ["93.184.216.34"]),
             tcp(WEB1, IP_WEB1, None, "93.184.216.34", 443)]
    assert egress(flows)[1]["toFQDNs"] == [{"matchName": "a.example.com"}, {"matchName": "b.example.net"}]


def test_destinations_are_grouped_by_their_exact_port_sets() -> None:
    flows = [*resolve("a.example.com", ["192.0.2.1"]), *resolve("b.example.com", ["192.0.2.2"]),
             *resolve("c.example.com", ["192.0.2.3"]),
             tcp(WEB1, IP_WEB1, None, "192.0.2.1", 443), tcp(WEB1, IP_WEB1, None, "192.0.2.2", 443),
             tcp(WEB1, IP_WEB1, None, "192.0.2.3", 443), tcp(WEB1, IP_WEB1, None, "192.0.2.3", 80),
             tcp(WEB1, IP_WEB1, None, "192.0.2.3", 5353, protocol=17),
             tcp(WEB1, IP_WEB1, DB, IP_DB, 5432), tcp(WEB2, IP_WEB2, DB, IP_DB, 5432, t=3)]
    # Rules of one kind are ordered by their port lists.
    assert egress(flows)[1:] == [
        {"toFQDNs": [{"matchName": "c.example.com"}], "toPorts": ports((80, "TCP"), (443, "TCP"), (5353, "UDP"))},
        {"toFQDNs": [{"matchName": "a.example.com"}, {"matchName": "b.example.com"}], "toPorts": ports((443, "TCP"))},
        {"toEndpoints": [{"matchLabels": {"app": "db", "io.kubernetes.pod.namespace": "shop"}}],
         "toPorts": ports((5432, "TCP"))},
    ]


def test_dns_over_tcp_and_a_server_that_is_not_a_pod() -> None:
    flows = [dns_query(WEB1, IP_WEB1, "a.example.com", protocol=6),
             dns_query(WEB1, IP_WEB1, "a.example.com"),
             dns_query(WEB1, IP_WEB1, "b.example.com", server=None, server_ip="8.8.8.8"),
             dns_answer(WEB1, IP_WEB1, "b.example.com", [], server=None, server_ip="8.8.8.8", rcode=3),
             # The DNS packets as L3/L4 flows fold into the DNS rule, not a rule of their own.
             tcp(WEB1, IP_WEB1, DNS, IP_DNS, 53, protocol=17), tcp(WEB1, IP_WEB1, None, "8.8.8.8", 53, protocol=17)]
    s = suggest(flows, WEB)
    assert s.policy["spec"]["egress"] == [
        {"toCIDR": ["8.8.8.8/32"], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}],
                                                 "rules": {"dns": [{"matchName": "b.example.com"}]}}]},
        dns_rule("a.example.com", protocols=("UDP", "TCP")),
    ]
    text = to_yaml(s)
    assert "# b.example.com: 1 query (Non-Existent Domain)" in text  # a failed lookup stays resolvable


# -- what is not the workload's egress ----------------------------------------------------

def test_replies_peer_initiated_ingress_copies_and_other_pods_are_not_egress() -> None:
    flows = [
        dns_query(WEB1, IP_WEB1, "a.example.com"),
        # db connected to web: web's answers are replies, by is_reply or by its SYN-ACK alone.
        tcp(DB, IP_DB, WEB1, IP_WEB1, 8080, direction=INGRESS),
        tcp(WEB1, IP_WEB1, DB, IP_DB, 40000, sport=8080, is_reply=True),
        tcp(WEB1, IP_WEB1, DB, IP_DB, 40001, sport=8080, is_reply=None, tcp_flag_counts=TcpFlagCounts(syn_ack=1)),
        # The INGRESS copy of web's own request, counted at the peer's interface.
        tcp(WEB1, IP_WEB1, DB, IP_DB, 9999, direction=INGRESS),
        # Another workload's egress, a TCP event and a non-IP frame.
        tcp(DB, IP_DB, None, "192.0.2.1", 443),
        tcp(WEB1, IP_WEB1, None, "192.0.2.2", 443, kind=EventKind.TCP_RETRANSMIT),
        Flow(time_ns=T0, node_name="n", verdict=Verdict.FORWARDED, ip_version=0, src_ip="", dst_ip="", protocol=0,
             traffic_direction=EGRESS, ethertype=0x0806, source=WEB1),
    ]
    assert egress(flows) == [dns_rule("a.example.com")]


def test_verdicts_forwarded_and_audit_by_default_dropped_on_request() -> None:
    flows = [tcp(WEB1, IP_WEB1, None, "192.0.2.1", 443), tcp(WEB1, IP_WEB1, None, "192.0.2.2", 443, verdict=Verdict.AUDIT),
             tcp(WEB1, IP_WEB1, None, "192.0.2.3", 443, verdict=Verdict.DROPPED),
             tcp(WEB1, IP_WEB1, None, "192.0.2.4", 443, verdict=Verdict.ERROR),
             dns_query(WEB1, IP_WEB1, "refused.example.com", verdict=Verdict.DROPPED)]
    assert egress(flows) == [{"toCIDR": ["192.0.2.1/32", "192.0.2.2/32"], "toPorts": ports((443, "TCP"))}]
    assert egress(flows, include_dropped=True) == [
        dns_rule("refused.example.com"),
        {"toCIDR": ["192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32"], "toPorts": ports((443, "TCP"))}]


def test_no_egress_denies_all_with_a_warning() -> None:
    s = suggest([tcp(DB, IP_DB, WEB1, IP_WEB1, 8080, direction=INGRESS)], WEB)
    assert s.policy["spec"]["egress"] == [{}]
    assert any("made no egress" in w for w in s.warnings)
    parsed = proxy_policy.parse_policy(yaml.safe_load(to_yaml(s)), "x")
    web = proxy_policy.Pod("web", "shop", {"app": "web", "version": "v1"}, (IP_WEB1,))
    policies = proxy_policy.PolicySet([parsed], [web])
    assert policies.is_policed(web) and policies.cidr_entries(web) == [] and not policies.dns_allowed(web, "a.b")


def test_icmp_lost_records_and_unusable_names_are_reported_not_allowed() -> None:
    flows: list[Record] = [tcp(WEB1, IP_WEB1, None, "192.0.2.1", 0, protocol=1, sport=8),
                           dns_query(WEB1, IP_WEB1, "bad name"), dns_query(WEB1, IP_WEB1, ""),
                           tcp(WEB1, IP_WEB1, None, "192.0.2.2", 0), tcp(WEB1, IP_WEB1, None, "not-an-ip", 443),
                           dns_query(WEB1, IP_WEB1, "a.example.com", server=None, server_ip="garbage"),
                           LostEvents(T0, "PERF_EVENT_RING_BUFFER", 7)]
    s = suggest(flows, WEB)
    assert s.policy["spec"]["egress"] == [{}]
    text = "\n".join(s.warnings)
    assert "ICMPv4 to 192.0.2.1 (1 flow) is not allowed" in text
    assert "'bad name.'" in text and "'.'" in text and "7 lost flow records" in text
    assert "1 flow of the selected pods left out: TCP without a destination port" in text  # port 0 = every port
    assert "left out: destination address is not an IP address" in text
    assert "left out: DNS server address is not an IP address" in text


# -- collapse ----------------------------------------------------------------------------

def test_collapse_only_at_the_threshold_and_never_to_a_top_level_domain() -> None:
    names = ["a.cdn.example.com", "b.cdn.example.com", "c.cdn.example.com", "cdn.example.com", "x.y.cdn.example.com",
             "one.com", "two.com", "three.com"]
    never = collapse_names(names, 0)
    assert all(not e.pattern for e in never) and len(never) == len(names)
    four = collapse_names(names, 4)
    assert all(not e.pattern for e in four)  # only 3 siblings under cdn.example.com
    three = collapse_names(names, 3)
    patterns = [e for e in three if e.pattern]
    assert [(e.value, e.members) for e in patterns] == [
        ("*.cdn.example.com", ("a.cdn.example.com", "b.cdn.example.com", "c.cdn.example.com"))]
    assert sorted(e.value for e in three if not e.pattern) == sorted(
        ["cdn.example.com", "x.y.cdn.example.com", "one.com", "two.com", "three.com"])
    # Cilium's semantics, as the proxy implements them: the pattern covers exactly the members.
    selector = proxy_policy.parse_fqdn_selector(patterns[0].selector(), "x")
    assert all(selector.matches(n) for n in patterns[0].members)
    assert not selector.matches("cdn.example.com") and not selector.matches("x.y.cdn.example.com")


def test_collapse_applies_to_the_dns_rule_and_each_port_group() -> None:
    flows: list[Record] = []
    for i, name in enumerate(("a.cdn.example.com", "b.cdn.example.com", "c.cdn.example.com")):
        flows += resolve(name, [f"192.0.2.{i + 1}"])
        flows.append(tcp(WEB1, IP_WEB1, None, f"192.0.2.{i + 1}", 443))
    assert egress(flows) == [
        dns_rule("a.cdn.example.com", "b.cdn.example.com", "c.cdn.example.com"),
        {"toFQDNs": [{"matchName": n} for n in ("a.cdn.example.com", "b.cdn.example.com", "c.cdn.example.com")],
         "toPorts": ports((443, "TCP"))}]
    s = suggest(flows, WEB, Options(collapse=3))
    assert s.policy["spec"]["egress"] == [
        dns_rule(patterns=("*.cdn.example.com",)),
        {"toFQDNs": [{"matchPattern": "*.cdn.example.com"}], "toPorts": ports((443, "TCP"))}]
    assert "collapses 3 sibling names" in to_yaml(s)


# -- selection ---------------------------------------------------------------------------

def test_endpoint_selector_is_the_labels_all_selected_pods_share() -> None:
    flows = [tcp(WEB1, IP_WEB1, None, "192.0.2.1", 443), tcp(WEB2, IP_WEB2, None, "192.0.2.1", 443)]
    s = suggest(flows, WEB)
    # version differs between the replicas; pod-template-hash and Cilium's labels never count.
    assert s.policy["spec"]["endpointSelector"] == {"matchLabels": {"app": "web"}}
    assert "pods web-7c9d-aaaaa, web-7c9d-bbbbb" in s.policy["metadata"]["annotations"]["policy.flowtel.io/observed"]
    assert suggest(flows, Selection("shop", pod="web-7c9d-a")).policy["spec"]["endpointSelector"] == {
        "matchLabels": {"app": "web", "version": "v1"}}


def test_selection_by_kind_pod_prefix_and_label() -> None:
    flows = [tcp(WEB1, IP_WEB1, None, "192.0.2.1", 443), tcp(DB, IP_DB, None, "192.0.2.2", 443)]
    assert egress(flows, Selection("shop", workload="Deployment/web"))[0]["toCIDR"] == ["192.0.2.1/32"]
    assert egress(flows, Selection("shop", workload="statefulset/db"))[0]["toCIDR"] == ["192.0.2.2/32"]
    assert egress(flows, Selection("shop", label="app=db"))[0]["toCIDR"] == ["192.0.2.2/32"]
    assert egress(flows, Selection("shop", pod="db-"))[0]["toCIDR"] == ["192.0.2.2/32"]
    with pytest.raises(SuggestError, match="no flows of the selected pods"):
        suggest(flows, Selection("shop", workload="StatefulSet/web"))
    with pytest.raises(SuggestError, match="no flows of the selected pods"):
        suggest(flows, Selection("other", workload="web"))
    names = {suggest(flows, sel).policy["metadata"]["name"] for sel in (
        Selection("shop", label="app=db"), Selection("shop", workload="StatefulSet/db"))}
    assert names == {"db"}
    assert suggest(flows, WEB, Options(name="web-egress")).policy["metadata"]["name"] == "web-egress"


def test_selector_that_selects_other_seen_pods_is_warned_about() -> None:
    canary = pod("web-canary-0", labels={"app": "web", "version": "v1", "track": "canary"}, workload="web-canary")
    flows = [tcp(WEB1, IP_WEB1, None, "192.0.2.1", 443), tcp(canary, "10.0.0.9", None, "192.0.2.2", 443)]
    s = suggest(flows, WEB)
    assert any("also selects pods outside the selection" in w and "shop/web-canary-0" in w for w in s.warnings)


@pytest.mark.parametrize("kwargs, message", [
    (dict(namespace=""), "--namespace"),
    (dict(namespace="shop"), "select the pods"),
    (dict(namespace="shop", workload="a/b/c"), "--workload"),
    (dict(namespace="shop", label="app in (a"), "--label"),
])
def test_bad_selections_are_errors(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(SuggestError, match=re.escape(message)):
        Selection(**kwargs)


def test_bad_options_and_unsharing_pods_are_errors() -> None:
    with pytest.raises(SuggestError, match="--collapse"):
        Options(collapse=1)
    with pytest.raises(SuggestError, match="--name"):
        Options(name="Not_A_Name")
    lonely = pod("lonely", labels={})
    with pytest.raises(SuggestError, match="share no label"):
        suggest([tcp(lonely, "10.0.0.5", None, "192.0.2.1", 443)], Selection("shop", pod="lonely"))


# -- output ------------------------------------------------------------------------------

def _mixed_flows() -> list[Record]:
    flows: list[Record] = [*resolve("api.example.com", ["192.0.2.1"], t=1), *resolve("b.cdn.example.com", ["192.0.2.2"], t=2),
                           *resolve("a.cdn.example.com", ["192.0.2.3"], t=3, client=WEB2, client_ip=IP_WEB2),
                           dns_query(WEB1, IP_WEB1, "missing.example.com", t=4)]
    for i, (ip, port) in enumerate((("192.0.2.1", 443), ("192.0.2.2", 443), ("192.0.2.3", 443), ("192.0.2.9", 22),
                                    ("2001:db8::1", 443), (IP_DB, 5432), (IP_DB, 5433))):
        flows.append(tcp(WEB1 if i % 2 else WEB2, IP_WEB1, DB if ip == IP_DB else None, ip, port, t=5 + i))
    flows += [tcp(WEB1, IP_WEB1, None, f"203.0.113.{i}", 7000 + i) for i in range(3)]
    return flows


def test_output_is_deterministic_whatever_the_input_order() -> None:
    flows = _mixed_flows()
    want_yaml = to_yaml(suggest(flows, WEB, Options(collapse=2)))
    want_json = to_json(suggest(flows, WEB, Options(collapse=2)))
    rng = random.Random(8)
    for _ in range(5):
        shuffled = flows[:]
        rng.shuffle(shuffled)
        s = suggest(shuffled, WEB, Options(collapse=2))
        assert to_yaml(s) == want_yaml and to_json(s) == want_json


def test_yaml_loads_back_as_the_json_and_the_proxy_parses_both() -> None:
    s = suggest(_mixed_flows(), WEB, Options(collapse=2, source="file flows.log"))
    text = to_yaml(s)
    assert yaml.safe_load(text) == s.policy == json.loads(to_json(s))
    proxy_policy.parse_policy(yaml.safe_load(text), "yaml")
    proxy_policy.parse_policy(json.loads(to_json(s)), "json")
    # Provenance: one annotation per rule, comments on rules and entries.
    annotations = s.policy["metadata"]["annotations"]
    assert [k for k in annotations if k.startswith("policy.flowtel.io/egress-")] == [
        f"policy.flowtel.io/egress-{i}" for i in range(len(s.policy["spec"]["egress"]))]
    assert "# api.example.com: TCP/443: 1 flow, 4 packets, 300 bytes, first 2024-11-26T11:45:50Z" in text
    assert "# missing.example.com: 1 query (no answer seen)" in text


@pytest.mark.parametrize("value", ["53", "*.example.com", "true", "No", "null", "~", "1.2.3.4/32", "2001:db8::1/128",
                                   "a: b", "#x", "- x", "x\ny", "\x1b[31m", "ünïcode", "", " lead", "trail ",
                                   "'q'", '"dq"', "1e3", ".inf", "0x1F", "app.kubernetes.io/name", "k8s-app", "yes"])
def test_yaml_scalars_load_back_unchanged(value: str) -> None:
    assert yaml.safe_load(f"k: {scalar(value)}") == {"k": value}


def test_many_ports_become_ranges_within_the_datapath_limit() -> None:
    flows = [tcp(WEB1, IP_WEB1, None, "192.0.2.1", p) for p in (*range(8000, 8010), 9000, 9002)]
    s = suggest(flows, WEB)
    assert s.policy["spec"]["egress"][0]["toPorts"] == [{"ports": [
        {"port": "8000", "protocol": "TCP", "endPort": 8009}, {"port": "9000", "protocol": "TCP"},
        {"port": "9002", "protocol": "TCP"}]}]
    rule = proxy_policy.parse_policy(yaml.safe_load(to_yaml(s)), "x").egress[0]
    assert rule.l4().ports[0] == proxy_policy.PortRange(8000, 8009, 6)
    many = [tcp(WEB1, IP_WEB1, None, "192.0.2.1", p) for p in range(8000, 8040, 2)]
    s = suggest(many, WEB)
    assert any("20 port ranges" in w for w in s.warnings)
    proxy_policy.parse_policy(s.policy, "x")  # split into toPorts items the parser takes


# -- the CRD shape -----------------------------------------------------------------------

# The parts of Cilium's CiliumNetworkPolicy CRD schema (cilium.io_ciliumnetworkpolicies.yaml)
# that a suggestion uses, with their patterns; additionalProperties false catches a misspelt key.
_FQDN = {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1, "properties": {
    "matchName": {"type": "string", "maxLength": 255, "pattern": r"^([-a-zA-Z0-9_]+[.]?)+$"},
    "matchPattern": {"type": "string", "maxLength": 255, "pattern": r"^([-a-zA-Z0-9_*]+[.]?)+$"}}}
_LABEL_VALUE = {"type": "string", "maxLength": 63, "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": _LABEL_VALUE}}}
_PORT = {"type": "object", "additionalProperties": False, "required": ["port"], "properties": {
    "port": {"type": "string", "pattern": r"^(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})$"},
    "endPort": {"type": "integer", "minimum": 0, "maximum": 65535},
    "protocol": {"enum": ["TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "VRRP", "IGMP", "ANY"]}}}
_PORT_RULE = {"type": "object", "additionalProperties": False, "properties": {
    "ports": {"type": "array", "maxItems": 40, "items": _PORT},
    "rules": {"type": "object", "additionalProperties": False, "properties": {"dns": {"type": "array", "items": _FQDN}}}}}
_EGRESS = {"type": "object", "additionalProperties": False, "maxProperties": 2, "properties": {
    "toEndpoints": {"type": "array", "items": _SELECTOR}, "toFQDNs": {"type": "array", "items": _FQDN},
    "toCIDR": {"type": "array", "items": {"type": "string"}}, "toPorts": {"type": "array", "items": _PORT_RULE}}}
CRD_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
              "properties": {"apiVersion": {"const": "cilium.io/v2"}, "kind": {"const": "CiliumNetworkPolicy"},
                             "metadata": {"type": "object"},
                             "spec": {"type": "object", "additionalProperties": False, "required": ["endpointSelector"],
                                      "properties": {"endpointSelector": _SELECTOR,
                                                     "egress": {"type": "array", "items": _EGRESS}}}}}
_QUALIFIED = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def _check_crd_shape(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, CRD_SCHEMA)
    # ObjectMeta against Kubernetes' own OpenAPI schema (a ConfigMap carries the same type).
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                 kubernetes_validate.latest_version(), strict=True)
    # What the API server checks beyond the schema: names, label and annotation keys, CIDRs,
    # one L3 selector kind per rule (Cilium rejects mixing them).
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", doc["metadata"]["name"])
    assert all(_QUALIFIED.match(k) for k in doc["metadata"]["annotations"])
    selectors = [doc["spec"]["endpointSelector"]] + [s for r in doc["spec"]["egress"] for s in r.get("toEndpoints", ())]
    assert all(_QUALIFIED.match(k) for s in selectors for k in s["matchLabels"])
    for rule in doc["spec"]["egress"]:
        assert sum(k in rule for k in ("toEndpoints", "toFQDNs", "toCIDR")) <= 1
        for cidr in rule.get("toCIDR", ()):
            ipaddress.ip_network(cidr, strict=True)


def test_output_has_the_crd_shape() -> None:
    for flows, options in ((list(sample_flows().values()), Options()), (_mixed_flows(), Options(collapse=2))):
        s = suggest(flows, Selection("shop", workload="frontend") if options.collapse == 0 else WEB, options)
        _check_crd_shape(yaml.safe_load(to_yaml(s)))
        _check_crd_shape(json.loads(to_json(s)))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**s.policy, "spec": {**s.policy["spec"], "egress": [{"toFQDN": []}]}}, CRD_SCHEMA)


# -- the command line --------------------------------------------------------------------

def _write_flow_log(path: Path, records: list[Record], garbage: str = "") -> None:
    lines = [json.dumps(hubble.record_envelope(r)) for r in records]
    if garbage:
        lines.insert(1, garbage)
    path.write_text("\n".join(lines) + "\n")


def test_cli_from_file_counts_unreadable_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "flows.log"
    _write_flow_log(log, list(sample_flows().values()), garbage='{"flow": {"truncated"')
    assert main(["policy", "suggest", "--from-file", str(log), "-n", "shop", "--workload", "frontend"]) == 0
    out, err = capsys.readouterr()
    want = suggest(list(sample_flows().values()), Selection("shop", workload="frontend"), Options(source=f"file {log}"))
    assert out == to_yaml(want)
    assert "1 input lines were not Hubble flow JSON and were skipped (first: line 2:" in err
    assert main(["policy", "suggest", "--from-file", str(log), "-n", "shop", "--workload", "frontend", "-o", "json",
                 "--since", "2024-11-26T11:45:50Z"]) == 0
    out, _ = capsys.readouterr()
    # Since T0+5 s: the query (T0+4 s) is outside the window; its answer and the connection are not.
    assert json.loads(out)["spec"]["egress"][1] == {"toFQDNs": [{"matchName": "www.example.com"}],
                                                    "toPorts": ports((443, "TCP"))}


@pytest.mark.parametrize("argv, code, message", [
    (["--from-file", "/nonexistent/flows.log", "--workload", "x"], 2, "cannot read /nonexistent/flows.log"),
    (["--from-file", "-", "--since", "yesterday", "--workload", "x"], 2, "--since"),
    (["--server", "127.0.0.1:1", "--workload", "x"], 1, "cannot reach a Hubble API at 127.0.0.1:1"),
    (["--server", "nonsense", "--workload", "x"], 2, "--server"),
    (["--workload", "x", "--collapse", "1"], 2, "--collapse"),
    (["-n", "shop"], 2, "select the pods"),
])
def test_cli_errors(argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "suggest", *argv]) == code
    assert message in capsys.readouterr().err


@pytest.fixture
def agent_api() -> Iterator[HubbleExtension]:
    """The agent's Hubble API (gRPC), what `policy suggest --server` reads."""
    ext = HubbleExtension(CreateSettings("hubble", "node-1", Telemetry()), HubbleConfig(endpoint="127.0.0.1:0"))
    ext.start()
    yield ext
    ext.shutdown()


def test_cli_from_a_running_flow_api(agent_api: HubbleExtension, capsys: pytest.CaptureFixture[str]) -> None:
    agent_api.consume([*sample_flows().values(), *_mixed_flows(), LostEvents(T0, "PERF_EVENT_RING_BUFFER", 2)])
    assert main(["policy", "suggest", "--server", agent_api.endpoint, "-n", "shop", "--workload", "frontend"]) == 0
    out, err = capsys.readouterr()
    want = suggest(list(sample_flows().values()), Selection("shop", workload="frontend"))
    assert yaml.safe_load(out)["spec"] == want.policy["spec"]
    assert "2 lost flow records" in err
    assert main(["policy", "suggest", "--server", agent_api.endpoint, "-n", "shop", "--label", "app=web",
                 "--collapse", "2", "-o", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["spec"] == suggest(_mixed_flows(), WEB, Options(collapse=2)).policy["spec"]
    assert main(["policy", "suggest", "--server", agent_api.endpoint, "-n", "shop", "--pod", "nothing-"]) == 1
    assert "no flows of the selected pods" in capsys.readouterr().err


def test_cli_help_names_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["policy", "suggest", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--server", "--from-file", "--since", "--until", "--namespace", "--workload", "--pod", "--label",
                 "--output", "--name", "--collapse", "--include-dropped"):
        assert flag in text


_HOSTILE_NAMES = """
import time
from flowtel.policysuggest import derive
started = time.monotonic()
# Python's re backtracks exponentially on these against Cilium's matchName pattern.
for name in ("a" * 40 + "!", "a-" * 100 + "!", "a." * 120 + "-!", "a" * 253):
    derive._valid_name(name)
assert derive._valid_name("a" * 40 + "!") is False and derive._valid_name("www.example.com") is True
assert derive._valid_object_name("a" * 200 + "-") is False and derive._valid_object_name("web-1.shop") is True
print(time.monotonic() - started)
"""


def test_names_a_workload_queried_are_checked_in_linear_time() -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _HOSTILE_NAMES], cwd=repo, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 5.0
