"""Policy parsing and matching: Cilium's semantics, and errors that name the policy."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from dnsproxy.policy import (ALL_PORTS, FqdnSelector, L4, Pod, PolicyError, PolicySet, PortRange, load_policy_dir,
                             parse_fqdn_selector, parse_policy)
from dnsproxy.server import DnsProxy, ProxyConfig, answer_ips


def pat(p: str) -> FqdnSelector:
    return parse_fqdn_selector({"matchPattern": p}, "t")


@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "A.Example.COM.", True),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "example.com", False),
    ("*.example.com", "aexample.com", False),
    ("*", "anything.at.all", True),
    ("*", "x", True),
    ("api-*.example.com", "api-v2.example.com", True),
    ("api-*.example.com", "api-v2.x.example.com", False),
    ("a*b.test", "ab.test", True),
    ("a*b.test", "a.b.test", False),
    ("example.com", "example.com", True),
    ("example.com", "examplexcom", False),  # the dot is literal, not a regex wildcard
])
def test_match_pattern(pattern: str, name: str, expected: bool) -> None:
    assert pat(pattern).matches(name) is expected


def test_match_name_is_exact_and_case_insensitive() -> None:
    sel = parse_fqdn_selector({"matchName": "API.example.com."}, "t")
    assert sel.matches("api.example.com")
    assert not sel.matches("x.api.example.com")
    with pytest.raises(PolicyError, match="matchName"):
        parse_fqdn_selector({"matchName": "*.example.com"}, "t")


def _cnp(name: str, spec: dict, kind: str = "CiliumNetworkPolicy") -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


DNS_RULE = {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}],
            "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                         "rules": {"dns": [{"matchPattern": "*.allowed.test"}, {"matchName": "exact.test"}]}}]}


@pytest.mark.parametrize(("spec", "message"), [
    ({"endpointSelector": {}, "egress": [{"toEntities": ["world"]}]}, r"egress\[0\]\.toEntities: not supported"),
    ({"endpointSelector": {}, "egress": [{"toFQDNs": [{"matchName": "a.test", "matchPattern": "*"}]}]},
     r"toFQDNs\[0\]: exactly one"),
    ({"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.300/8"]}]}, r"toCIDR\[0\]: '10.0.0.300/8' is not a CIDR"),
    ({"endpointSelector": {}, "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}]},
     r"except: 11.0.0.0/16 is not inside 10.0.0.0/8"),
    ({"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "http"}]}]}]}, r"named ports"),
    ({"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "ICMP"}]}]}]},
     r"protocol: 'ICMP'"),
    ({"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"dns": [{"matchPattern": "*"}]}}]}]},
     r"DNS rules need toPorts port 53"),
    ({"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}, r"operator: 'Near'"),
    ({"egress": []}, r"endpointSelector: required"),
    ({"endpointSelector": {}, "egressDeny": []}, r"egressDeny: not supported"),
    ({"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]}]},
     r"only dns rules"),
])
def test_invalid_policies_are_named(spec: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as err:
        parse_policy(_cnp("broken-one", spec), "f.yaml#0")
    assert "CiliumNetworkPolicy broken-one (f.yaml#0)" in str(err.value)


def test_wrong_api_version_named() -> None:
    doc = _cnp("old", {"endpointSelector": {}})
    doc["apiVersion"] = "cilium.io/v1"
    with pytest.raises(PolicyError, match=r"old .*apiVersion must be cilium.io/v2"):
        parse_policy(doc, "f.yaml#0")


def test_one_bad_policy_does_not_stop_the_others(tmp_path: Path) -> None:
    import yaml

    good = _cnp("good", {"endpointSelector": {"matchLabels": {"app": "a"}}, "egress": [DNS_RULE]})
    bad = _cnp("bad", {"endpointSelector": {}, "egress": [{"toServices": []}]})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all([good, bad]))
    (tmp_path / "q.yaml").write_text("{unclosed")
    result = load_policy_dir(tmp_path)
    assert [p.name for p in result.policies] == ["good"]
    assert len(result.errors) == 2
    assert any("CiliumNetworkPolicy bad (p.yaml#1)" in e and "toServices" in e for e in result.errors)
    assert any("q.yaml" in e for e in result.errors)


def _set(*specs: dict, kind: str = "CiliumNetworkPolicy") -> tuple[PolicySet, dict[str, Pod]]:
    pods = {
        "client": Pod("client", "shop", {"app": "client"}, ("10.0.0.1",)),
        "other-ns": Pod("client", "other", {"app": "client"}, ("10.0.0.2",)),
        "free": Pod("free", "shop", {"app": "free"}, ("10.0.0.3",)),
        "db": Pod("db", "shop", {"app": "db"}, ("10.0.0.4",)),
        "kube-dns": Pod("coredns", "kube-system", {"k8s-app": "kube-dns"}, ("10.0.0.53",)),
    }
    policies = [parse_policy(_cnp(f"p{i}", s, kind), "t") for i, s in enumerate(specs)]
    return PolicySet(policies, list(pods.values())), pods


def test_selection_namespace_and_default_deny() -> None:
    ps, pods = _set({"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": [DNS_RULE]})
    assert ps.is_policed(pods["client"])
    assert not ps.is_policed(pods["other-ns"])  # a namespaced policy selects in its namespace only
    assert not ps.is_policed(pods["free"])
    ccnp, cpods = _set({"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": []},
                       kind="CiliumClusterwideNetworkPolicy")
    assert ccnp.is_policed(cpods["client"]) and ccnp.is_policed(cpods["other-ns"])
    ingress_only, ipods = _set({"endpointSelector": {}, "ingress": []})
    assert not ingress_only.is_policed(ipods["client"])


def test_dns_rules_and_fqdn_ports() -> None:
    ps, pods = _set({"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": [
        DNS_RULE,
        {"toFQDNs": [{"matchPattern": "*.allowed.test"}], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
        {"toFQDNs": [{"matchName": "api.allowed.test"}]},
    ]})
    c = pods["client"]
    assert ps.dns_allowed(c, "api.allowed.test.")
    assert ps.dns_allowed(c, "exact.test")
    assert not ps.dns_allowed(c, "a.b.allowed.test")
    assert not ps.dns_allowed(c, "blocked.test")
    assert ps.fqdn_l4(c, "www.allowed.test") == L4(False, (PortRange(443, 443, 6),))
    assert ps.fqdn_l4(c, "api.allowed.test") == ALL_PORTS  # a rule without toPorts allows every port
    assert ps.fqdn_l4(c, "exact.test") is None  # resolvable, but no toFQDNs rule opens its IPs


def test_cidr_entries_longest_match_semantics() -> None:
    ps, pods = _set({"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": [
        {"toCIDRSet": [{"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}],
         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]},
        {"toCIDR": ["192.0.2.192/26"]},
        {"toEndpoints": [{"matchLabels": {"app": "db"}}]},
    ]})
    entries = {str(e.network): e.l4 for e in ps.cidr_entries(pods["client"])}
    assert entries["192.0.2.0/24"] == L4(False, (PortRange(80, 80, 6),))
    assert entries["192.0.2.128/25"] is None  # the hole: nothing allows it
    assert entries["192.0.2.192/26"] == ALL_PORTS  # another rule allows inside the hole
    assert entries["10.0.0.4/32"] == ALL_PORTS  # the db pod, by labels, in the policy's namespace
    assert "10.0.0.53/32" not in entries


def test_answer_ips_follow_cname_chain() -> None:
    q = dns.message.make_query("www.allowed.test", "A")
    r = dns.message.make_response(q)
    r.answer = [
        dns.rrset.from_text("www.allowed.test.", 300, "IN", "CNAME", "edge.cdn.test."),
        dns.rrset.from_text("edge.cdn.test.", 30, "IN", "CNAME", "pop.cdn.test."),
        dns.rrset.from_text("pop.cdn.test.", 120, "IN", "A", "192.0.2.7", "192.0.2.8"),
        dns.rrset.from_text("unrelated.test.", 120, "IN", "A", "192.0.2.99"),
    ]
    ips, ttl, chain = answer_ips(r, "www.allowed.test.")
    assert ips == ["192.0.2.7", "192.0.2.8"]
    assert ttl == 30
    assert chain == ["edge.cdn.test", "pop.cdn.test"]


class _Learner:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str], int, float, L4]] = []

    def learn(self, pod_ips: list[str], dst_ips: list[str], ttl_s: int, grace_s: float, l4: L4) -> None:
        self.calls.append((pod_ips, dst_ips, ttl_s, grace_s, l4))


def test_proxy_refuses_denied_names_without_asking_upstream(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "p.yaml").write_text(yaml.safe_dump(_cnp("c", {
        "endpointSelector": {"matchLabels": {"app": "client"}}, "egress": [DNS_RULE]})))
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump({"pods": [
        {"name": "client", "namespace": "shop", "ips": ["10.0.0.1"], "labels": {"app": "client"}}]}))
    for rcode in (dns.rcode.REFUSED, dns.rcode.NXDOMAIN):
        # Upstream is a closed port: if the proxy asked it, the answer would be SERVFAIL.
        proxy = DnsProxy(ProxyConfig(str(tmp_path / "pol"), str(tmp_path / "pods.yaml"), ("127.0.0.1", 9),
                                     refuse_rcode=rcode, upstream_timeout_s=0.2), _Learner())
        proxy.reload()
        wire = dns.message.make_query("blocked.test", "A").to_wire()
        resp = dns.message.from_wire(proxy.handle(wire, "10.0.0.1", tcp=False) or b"")
        assert resp.rcode() == rcode
        assert proxy.stats.refused == 1 and proxy.stats.upstream_errors == 0
        allowed = dns.message.make_query("x.allowed.test", "A").to_wire()
        assert dns.message.from_wire(proxy.handle(allowed, "10.0.0.1", tcp=False) or b"").rcode() == dns.rcode.SERVFAIL
        assert proxy.stats.upstream_errors == 1
    assert ipaddress.ip_address("10.0.0.1")  # the pods file address parsed as an address
