"""The policy model: parsing, selection, DNS verdicts and the datapath's entries."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from flowtel.lib.policy import (ALL_PORTS, FqdnSelector, L4, Pod, PolicyError, PolicySet, PortRange, load_policy_dir,
                                parse_fqdn_selector, parse_policy)


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
    ({"endpointSelector": {}, "egress": [{"toEntities": ["moon"]}]}, r"egress\[0\]\.toEntities\[0\]: unsupported entity"),
    ({"endpointSelector": {}, "egress": [{"toFQDNs": [{"matchName": "a.test", "matchPattern": "*"}]}]},
     r"toFQDNs\[0\]: exactly one"),
    ({"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.300/8"]}]}, r"toCIDR\[0\]: '10.0.0.300/8' is not a CIDR"),
    ({"endpointSelector": {}, "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}]},
     r"except: allow CIDR prefix 10.0.0.0/8 does not contain exclude CIDR prefix 11.0.0.0/16"),
    ({"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "-1x"}]}]}]}, r"neither a port number nor"),
    ({"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "ICMP"}]}]}]},
     r"protocol: 'ICMP'"),
    ({"endpointSelector": {}, "egress": [{"toPorts": [{"rules": {"dns": [{"matchPattern": "*"}]}}]}]},
     r"port 53 must be specified for DNS rules"),
    ({"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}, r"operator: 'Near'"),
    ({"egress": [{}]}, r"rule must have one of endpointSelector or nodeSelector"),
    ({"endpointSelector": {}}, r"rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny"),
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
    bad = _cnp("bad", {"endpointSelector": {}, "egress": [{"toEndpoints": [{}], "toServices": [{}]}]})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all([good, bad]))
    (tmp_path / "q.yaml").write_text("{unclosed")
    result = load_policy_dir(tmp_path)
    assert [p.name for p in result.policies] == ["good"]
    assert len(result.errors) == 2
    assert any("CiliumNetworkPolicy bad (p.yaml#1)" in e and "combining toEndpoints and toServices" in e
               for e in result.errors)
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
    ccnp, cpods = _set({"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": [{}]},
                       kind="CiliumClusterwideNetworkPolicy")
    assert ccnp.is_policed(cpods["client"]) and ccnp.is_policed(cpods["other-ns"])
    ingress_only, ipods = _set({"endpointSelector": {}, "ingress": [{}]})
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


# -- peers: toEndpoints across nodes -------------------------------------------------------

def _peer_set(node: str = "node-1") -> tuple[PolicySet, list[Pod]]:
    pods = [
        Pod("client", "shop", {"app": "client"}, ("10.0.0.1",), "node-1"),
        Pod("db-0", "shop", {"app": "db"}, ("10.0.1.4", "fd00::4"), "node-2"),  # another node
        Pod("db-1", "shop", {"app": "db"}, ("10.0.0.5",), "node-1"),
        Pod("db-x", "other", {"app": "db"}, ("10.0.2.6",), "node-2"),  # another namespace
        Pod("client", "shop-b", {"app": "client"}, ("10.0.2.7",), "node-2"),  # would be selected, is a peer
    ]
    policy = parse_policy(_cnp("p", {"endpointSelector": {"matchLabels": {"app": "client"}},
                                     "egress": [{"toEndpoints": [{"matchLabels": {"app": "db"}}]}]},
                               kind="CiliumClusterwideNetworkPolicy"), "t")
    return PolicySet([policy], pods, node=node), pods


def test_to_endpoints_selects_peers_on_other_nodes_but_only_this_nodes_pods_are_policed() -> None:
    ps, pods = _peer_set()
    assert [p.key for p in ps.policed_pods()] == ["shop/client"]  # shop-b/client runs on node-2
    assert ps.pod_by_ip("10.0.1.4") is None  # a peer is no pod of this node (no DNS policy for it)
    entries = {str(e.network): e.l4 for e in ps.cidr_entries(pods[0])}
    # Clusterwide policy: db pods of every namespace and node, IPv4 and IPv6.
    assert entries == {"10.0.0.5/32": ALL_PORTS, "10.0.1.4/32": ALL_PORTS, "10.0.2.6/32": ALL_PORTS,
                       "fd00::4/128": ALL_PORTS}
    # A proxy that names no node (or pods without a node) treats every pod as its own.
    assert len(PolicySet(ps.policies, pods).policed_pods()) == 2


def test_endpoint_index_follows_peers_one_pod_at_a_time() -> None:
    ps, pods = _peer_set()
    index = ps.endpoints
    (sel,) = ps.endpoint_selectors()
    assert index.addresses(sel) == {"10.0.0.5", "10.0.1.4", "fd00::4", "10.0.2.6"}
    v = index.version
    # A peer not selected changes: nothing a selector in use selects moved.
    index.upsert("x/web", Pod("web", "x", {"app": "web"}, ("10.9.0.1",)).identity(), ("10.9.0.1",))
    assert index.version == v
    # Relabelled into the selector, then out; its address moves; deleted.
    index.upsert("x/web", Pod("web", "x", {"app": "db"}, ()).identity(), ("10.9.0.1",))
    assert "10.9.0.1" in index.addresses(sel) and index.version > v
    v = index.version
    index.upsert("x/web", Pod("web", "x", {"app": "db"}, ()).identity(), ("10.9.0.2",))
    assert {"10.9.0.2"} <= index.addresses(sel) and "10.9.0.1" not in index.addresses(sel) and index.version > v
    index.upsert("x/web", Pod("web", "x", {"app": "web"}, ()).identity(), ("10.9.0.2",))
    assert "10.9.0.2" not in index.addresses(sel)
    index.upsert("shop/db-1", pods[2].identity(), ())  # lost its address (e.g. restarting)
    assert "10.0.0.5" not in index.addresses(sel)
    v = index.version
    index.remove("shop/db-0")
    assert index.addresses(sel) == {"10.0.2.6"} and index.version > v
    # Replicas share one identity; an address two pods hold stays until both let it go.
    index.upsert("shop/db-2", pods[1].identity(), ("10.0.2.6",))
    index.remove("other/db-x")
    assert index.addresses(sel) == {"10.0.2.6"}
    # shop/app=client, shop-b/app=client, x/app=web and one for shop's db replicas (db-1, db-2).
    assert index.identities() == 4 and len(index) == 5
    # A selector no policy uses any more is forgotten; asking again re-resolves it.
    index.retain(set())
    v = index.version
    index.remove("shop/db-2")
    assert index.version == v  # no selector in use: no recompute wanted
    assert index.addresses(sel) == set()


def test_namespace_labels_and_nodes_from_the_pods_file(tmp_path: Path) -> None:
    import yaml

    from flowtel.lib.policy import NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL, load_pods

    (tmp_path / "pods.yaml").write_text(yaml.safe_dump({
        "namespaces": [{"name": "data", "labels": {"team": "storage"}}],
        "pods": [{"name": "client", "namespace": "shop", "ips": ["10.0.0.1"], "labels": {"app": "client"},
                  "node": "node-1"},
                 {"name": "db-0", "namespace": "data", "ips": ["10.0.1.4"], "labels": {"app": "db"},
                  "node": "node-2", "service_account": "db"}]}))
    pods = load_pods(tmp_path / "pods.yaml")
    assert pods[1].node == "node-2" and pods[1].labels[NAMESPACE_LABELS_PREFIX + "team"] == "storage"
    assert pods[1].labels[SERVICE_ACCOUNT_LABEL] == "db" and pods[0].labels[SERVICE_ACCOUNT_LABEL] == "default"
    policy = parse_policy(_cnp("p", {"endpointSelector": {}, "egress": [{"toEndpoints": [{"matchLabels": {
        "k8s:io.kubernetes.pod.namespace": "data", f"{NAMESPACE_LABELS_PREFIX}team": "storage",
        SERVICE_ACCOUNT_LABEL: "db"}}]}]}), "t")
    ps = PolicySet([policy], pods, node="node-1")
    assert [p.key for p in ps.policed_pods()] == ["shop/client"]
    assert [str(e.network) for e in ps.cidr_entries(ps.pods[0])] == ["10.0.1.4/32"]
    (tmp_path / "bad.yaml").write_text("pods: [{name: a, labels: [x]}]")
    with pytest.raises(PolicyError, match=r"pods\[0\]\.labels: expected a mapping"):
        load_pods(tmp_path / "bad.yaml")


def test_endpoint_addresses_merge_with_cidrs_of_the_same_prefix() -> None:
    ps, pods = _set({"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": [
        {"toEndpoints": [{"matchLabels": {"app": "db"}}], "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]},
        {"toCIDRSet": [{"cidr": "10.0.0.0/24", "except": ["10.0.0.4/32"]}],
         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]},
        {"toCIDR": ["10.0.0.53/32"], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]},
    ]})
    entries = [(str(e.network), e.l4) for e in ps.cidr_entries(pods["client"])]
    # The db pod's address is the except hole of one rule and an endpoint of another: one
    # entry, allowed on the endpoint rule's port only; a pod inside the CIDR gets no entry of its own.
    assert entries == [("10.0.0.0/24", L4(False, (PortRange(80, 80, 6),))),
                       ("10.0.0.4/32", L4(False, (PortRange(5432, 5432, 6),))),
                       ("10.0.0.53/32", L4(False, (PortRange(80, 80, 6), PortRange(53, 53, 17))))]


def test_nodes_and_the_api_server_from_the_pods_file(tmp_path: Path) -> None:
    import yaml

    from flowtel.lib.policy import load_node_addresses

    (tmp_path / "pods.yaml").write_text(yaml.safe_dump({
        "pods": [], "kube_apiserver": ["10.96.0.1"],
        "nodes": [{"name": "node-1", "ips": ["192.168.0.1"]}, {"name": "node-2", "ips": ["192.168.0.2", "fd00::2"]}]}))
    assert load_node_addresses(tmp_path / "pods.yaml", "node-1") == (["192.168.0.2", "fd00::2"], ["10.96.0.1"])
    assert load_node_addresses(tmp_path / "pods.yaml", "") == ([], ["10.96.0.1"])  # which node is ours is unknown
