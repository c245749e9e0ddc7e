"""Rule shapes, fail-closed evaluation and DNS verdicts, against Cilium's own cases.

Sources (cilium/cilium): pkg/policy/api/rule_validation.go and rule_validation_test.go
(L3 members one per rule, ICMPs without ToPorts, DNS rules without port ranges, on egress
only, port 53 specified, L7 not on port 0, 40 ports per item), pkg/policy/api/entity.go (the
entities), Documentation/security/dns.rst (an L4-only port-53 rule allows every name; the
DNS rule's L3 part selects the resolvers).
"""
from __future__ import annotations

import ipaddress

import pytest

from flowtel.lib.policy import (ALL_PORTS, L4, NodeAddresses, Pod, PolicyError, PolicySet, PortRange, parse_policy,
                                service_from_spec)

KUBE_DNS = {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}


def _cnp(spec: dict, name: str = "p") -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "client"}}, **spec}}


def _dns_rule(dns: list | None = None, l3: dict | None = None, ports: list | None = None) -> dict:
    item: dict = {"ports": ports or [{"port": "53", "protocol": "ANY"}]}
    if dns is not None:
        item["rules"] = {"dns": dns}
    return {**(l3 if l3 is not None else {"toEndpoints": [KUBE_DNS]}), "toPorts": [item]}


PODS = [Pod("client", "shop", {"app": "client"}, ("10.0.0.1",)),
        Pod("db", "shop", {"app": "db"}, ("10.0.0.4",)),
        Pod("coredns", "kube-system", {"k8s-app": "kube-dns"}, ("10.0.0.53",))]


SERVICES = [
    service_from_spec("kube-dns", "kube-system", {"clusterIP": "10.96.0.10", "selector": {"k8s-app": "kube-dns"},
                                                   "ports": [{"port": 53, "protocol": "UDP", "targetPort": 53},
                                                             {"port": 53, "protocol": "TCP", "targetPort": 53}]}, {}, "t"),
    service_from_spec("db", "shop", {"clusterIP": "10.96.0.20", "selector": {"app": "db"},
                                     "ports": [{"port": 80, "targetPort": 5432}]}, {"tier": "data"}, "t"),
    service_from_spec("manual", "shop", {"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}, {}, "t"),
]


def _set(spec: dict, nodes: NodeAddresses = NodeAddresses(), services: list | None = None) -> tuple[PolicySet, Pod]:
    ps = PolicySet([parse_policy(_cnp(spec), "t")], PODS, nodes=nodes, services=services or [])
    return ps, PODS[0]


def _entries(ps: PolicySet, pod: Pod) -> dict[str, tuple[L4 | None, bool]]:
    return {str(e.network): (e.l4, e.deny) for e in ps.cidr_entries(pod)}


# -- Cilium rejects these (so does flowtel: neither enforces them) ---------------------------

@pytest.mark.parametrize(("egress", "message"), [
    ({"toEndpoints": [{}], "toCIDR": ["10.0.0.0/8"]}, "combining toEndpoints and toCIDR is not supported yet"),
    ({"toFQDNs": [{"matchName": "a.test"}], "toEntities": ["world"]}, "combining toEntities and toFQDNs"),
    ({"toCIDRSet": [{"cidr": "10.0.0.0/8"}], "toServices": [{}]}, "combining toCIDRSet and toServices"),
    ({"icmps": [{"fields": [{"type": 8}]}], "toPorts": [{"ports": [{"port": "80"}]}]},
     "the ICMPs block may only be present without ToPorts"),
    ({"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "53", "endPort": 60}], "rules": {"dns": [{"matchName": "a"}]}}]},
     "DNS rules do not support port ranges"),
    ({"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "0"}], "rules": {"dns": [{"matchName": "a"}]}}]},
     "L7 rules can not be used when a port is 0"),
    ({"toPorts": [{"rules": {"dns": [{"matchName": "a"}]}}]}, "port 53 must be specified for DNS rules"),
    ({"toPorts": [{"ports": [{"port": str(1000 + i)} for i in range(41)]}]}, "too many ports, the max is 40"),
    ({"icmps": [{"fields": [{"type": 8}] * 41}]}, "too many types, the max is 40"),
    ({"icmps": [{"fields": [{"type": 8, "family": "IPv5"}]}]}, "wrong family"),
    ({"toEntities": ["everything"]}, "unsupported entity: everything"),
    ({"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}]}, "does not contain exclude CIDR prefix"),
    ({"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"method": "GET"}]}}]}, "only dns rules"),
])
def test_rules_cilium_rejects(egress: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(_cnp({"egress": [egress]}), "t")


def test_dns_rules_on_ingress_are_rejected() -> None:
    with pytest.raises(PolicyError, match="DNS rules are not allowed on ingress"):
        parse_policy(_cnp({"ingress": [{"toPorts": [{"ports": [{"port": "53"}], "rules": {"dns": [{"matchName": "a"}]}}]}]}), "t")


@pytest.mark.parametrize("egress", [
    {"toPorts": [{"ports": [{"port": str(1000 + i)} for i in range(40)]}]},  # Cilium's maximum
    {"toFQDNs": [{"matchPattern": "*.test"}], "toPorts": [{"ports": [{"port": "443", "endPort": 445}]}]},
    {"toEntities": ["kube-apiserver"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
    {"icmps": [{"fields": [{"type": "EchoRequest", "family": "IPv6"}, {"type": 8}]}]},
])
def test_rules_cilium_accepts_parse(egress: dict) -> None:
    parse_policy(_cnp({"egress": [egress]}), "t")


# -- DNS: the resolver binding and L7 semantics ----------------------------------------------

def test_dns_is_bound_to_the_rules_resolvers_ports_and_protocols() -> None:
    ps, c = _set({"egress": [_dns_rule([{"matchPattern": "*.allowed.test"}],
                                       ports=[{"port": "53", "protocol": "UDP"}])]})
    assert ps.dns_verdict(c, "a.allowed.test", "10.0.0.53", 53, 17) is True
    assert ps.dns_verdict(c, "a.denied.test", "10.0.0.53", 53, 17) is False
    assert ps.dns_verdict(c, "a.allowed.test", "192.0.2.99", 53, 17) is None  # a rogue resolver
    assert ps.dns_verdict(c, "a.allowed.test", "10.0.0.53", 53, 6) is None  # TCP: the rule names UDP
    assert ps.dns_verdict(c, "a.allowed.test", "10.0.0.4", 53, 17) is None  # another pod of the cluster
    entries = _entries(ps, c)
    assert entries == {"10.0.0.53/32": (L4(False, (PortRange(53, 53, 17),)), False)}


@pytest.mark.parametrize("dns", [None, []])
def test_l4_only_port_53_rule_allows_every_name(dns: list | None) -> None:
    # Cilium: without rules.dns (absent or empty) the port-53 rule is L4-only; no name is refused.
    ps, c = _set({"egress": [_dns_rule(dns)]})
    assert ps.dns_verdict(c, "anything.example", "10.0.0.53", 53, 17) is True
    assert ps.dns_verdict(c, "anything.example", "192.0.2.99", 53, 17) is None


def test_an_l4_only_rule_beside_a_dns_rule_for_the_same_resolver_allows_every_name() -> None:
    ps, c = _set({"egress": [_dns_rule([{"matchName": "only.test"}]), _dns_rule(None)]})
    assert ps.dns_verdict(c, "other.test", "10.0.0.53", 53, 17) is True


def test_dns_rule_without_l3_selects_every_resolver_and_deny_overrides_it() -> None:
    ps, c = _set({"egress": [_dns_rule([{"matchName": "a.test"}], l3={})],
                  "egressDeny": [{"toCIDR": ["192.0.2.0/24"]}]})
    assert ps.dns_verdict(c, "a.test", "198.51.100.1", 53, 6) is True
    assert ps.dns_verdict(c, "a.test", "192.0.2.1", 53, 17) is None
    entries = _entries(ps, c)
    assert entries["192.0.2.0/24"] == (None, True)


def test_dns_rules_on_other_ports_are_denied_and_reported() -> None:
    ps, c = _set({"egress": [_dns_rule([{"matchName": "a.test"}], ports=[{"port": "53"}, {"port": "5353"}])]})
    assert ps.dns_verdict(c, "a.test", "10.0.0.53", 5353, 17) is None
    (notes,) = ps.degraded.values()
    assert "5353" in notes[0] and "denied" in notes[0]
    assert _entries(ps, c)["10.0.0.53/32"][0] == L4(False, (PortRange(53, 53, 17), PortRange(53, 53, 6)))


# -- Services: the datapath sees the ClusterIP, before kube-proxy's DNAT ----------------------

def test_the_cluster_dns_service_ip_is_a_resolver_when_its_backends_are() -> None:
    ps, c = _set({"egress": [_dns_rule([{"matchName": "a.test"}])]}, services=SERVICES)
    assert ps.dns_verdict(c, "a.test", "10.96.0.10", 53, 17) is True
    assert ps.dns_verdict(c, "b.test", "10.96.0.10", 53, 6) is False
    assert ps.dns_verdict(c, "a.test", "10.96.0.20", 53, 17) is None  # another Service's IP
    entries = _entries(ps, c)
    assert entries["10.96.0.10/32"] == (L4(False, (PortRange(53, 53, 17), PortRange(53, 53, 6))), False)
    assert "10.96.0.20/32" not in entries


def test_a_name_via_a_service_ip_must_be_allowed_whichever_backend_answers() -> None:
    dns2 = Pod("coredns-2", "kube-system", {"k8s-app": "kube-dns"}, ("10.0.0.54",))
    spec = {"egress": [_dns_rule([{"matchName": "a.test"}, {"matchName": "b.test"}]),
                       _dns_rule([{"matchName": "a.test"}], l3={"toCIDR": ["10.0.0.54/32"]})]}
    ps = PolicySet([parse_policy(_cnp(spec), "t")], [*PODS, dns2], services=SERVICES)
    c = PODS[0]
    assert ps.dns_verdict(c, "a.test", "10.96.0.10", 53, 17) is True
    # b.test: kube-dns's first backend would allow it, but the second is bound by both rules
    # (b.test allowed there too via the label rule) ...
    assert ps.dns_verdict(c, "b.test", "10.0.0.54", 53, 17) is True
    only_cidr = {"egress": [_dns_rule([{"matchName": "a.test"}, {"matchName": "b.test"}],
                                      l3={"toCIDR": ["10.0.0.53/32"]}),
                            _dns_rule([{"matchName": "a.test"}], l3={"toCIDR": ["10.0.0.54/32"]})]}
    ps = PolicySet([parse_policy(_cnp(only_cidr), "t")], [*PODS, dns2], services=SERVICES)
    assert ps.dns_verdict(c, "a.test", "10.96.0.10", 53, 17) is True
    assert ps.dns_verdict(c, "b.test", "10.0.0.53", 53, 17) is True
    assert ps.dns_verdict(c, "b.test", "10.96.0.10", 53, 17) is False  # the second backend refuses it


def test_a_service_ip_is_allowed_on_its_port_only_when_every_backend_is() -> None:
    db2 = Pod("db-2", "shop", {"app": "db"}, ("10.0.0.5",))
    rule = {"toCIDR": ["10.0.0.4/32"], "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}
    one = PolicySet([parse_policy(_cnp({"egress": [rule]}), "t")], [*PODS, db2], services=SERVICES)
    assert "10.96.0.20/32" not in _entries(one, PODS[0])  # db-2 is not allowed: kube-proxy might pick it
    both = PolicySet([parse_policy(_cnp({"egress": [{"toEndpoints": [{"matchLabels": {"app": "db"}}],
                                                     "toPorts": rule["toPorts"]}]}), "t")], [*PODS, db2],
                     services=SERVICES)
    assert _entries(both, PODS[0])["10.96.0.20/32"] == (L4(False, (PortRange(80, 80, 6),)), False)


@pytest.mark.parametrize("to", [{"k8sService": {"serviceName": "db"}},
                                {"k8sServiceSelector": {"selector": {"matchLabels": {"tier": "data"}}}}])
def test_to_services_allows_the_backends_and_the_service_ip(to: dict) -> None:
    ps, c = _set({"egress": [{"toServices": [to]}]}, services=SERVICES)
    entries = _entries(ps, c)
    assert entries["10.0.0.4/32"] == (ALL_PORTS, False)
    assert entries["10.96.0.20/32"] == (L4(False, (PortRange(80, 80, 6),)), False)
    assert ps.degraded == {}


# -- fail closed: what flowtel cannot evaluate allows nothing, and is reported ---------------

@pytest.mark.parametrize(("egress", "field"), [
    ({"toServices": [{"k8sService": {"serviceName": "manual", "namespace": "shop"}}]}, "without a selector"),
    ({"toGroups": [{"aws": {"securityGroupsIds": ["sg-1"]}}]}, "toGroups"),
    ({"toNodes": [{}]}, "toNodes"),
    ({"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "http"}]}]}, "named port 'http'"),
    ({"toCIDRSet": [{"cidrGroupRef": "corp"}]}, "CiliumCIDRGroups"),
    ({"toEntities": ["remote-node"]}, "remote-node"),
    ({"toEntities": ["kube-apiserver"]}, "kube-apiserver"),
    ({"toEntities": ["health"]}, "health"),
])
def test_unevaluable_fields_keep_the_pod_policed_deny_and_are_reported(egress: dict, field: str) -> None:
    ps, c = _set({"egress": [egress, _dns_rule(None)]}, services=[SERVICES[2]])  # a Service without a selector
    assert ps.is_policed(c)  # never un-policed by a field flowtel does not evaluate
    (notes,) = ps.degraded.values()
    assert any(field in n for n in notes), notes
    entries = _entries(ps, c)
    # Only the DNS rule allows anything.
    assert entries == {"10.0.0.53/32": (L4(False, (PortRange(53, 53, 0),)), False)}, entries


def test_named_port_beside_numbers_denies_only_the_named_one() -> None:
    ps, c = _set({"egress": [{"toEndpoints": [{"matchLabels": {"app": "db"}}],
                              "toPorts": [{"ports": [{"port": "postgres"}, {"port": "5432", "protocol": "TCP"}]}]}]})
    assert _entries(ps, c)["10.0.0.4/32"] == (L4(False, (PortRange(5432, 5432, 6),)), False)


def test_more_ranges_than_the_datapath_holds_are_merged_then_reported() -> None:
    ps, c = _set({"egress": [{"toCIDR": ["192.0.2.0/24"],
                              "toPorts": [{"ports": [{"port": str(p), "protocol": "TCP"} for p in range(8000, 8040)]}]}]})
    assert _entries(ps, c)["192.0.2.0/24"][0] == L4(False, (PortRange(8000, 8039, 6),))
    assert ps.degraded == {}
    wide, c = _set({"egress": [{"toCIDR": ["192.0.2.0/24"],
                                "toPorts": [{"ports": [{"port": str(p), "protocol": "TCP"} for p in range(8000, 8040, 2)]}]}]})
    assert "the datapath holds 8" in next(iter(wide.degraded.values()))[0]


# -- entities --------------------------------------------------------------------------------

NODES = NodeAddresses(host=("192.168.0.10",), remote_nodes=("192.168.0.11",), kube_apiserver=("10.96.0.1", "192.168.0.5"))


def test_kube_apiserver_entity_is_the_service_ip_and_the_servers() -> None:
    ps, c = _set({"egress": [{"toEntities": ["kube-apiserver"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]},
                 NODES)
    https = L4(False, (PortRange(443, 443, 6),))
    assert _entries(ps, c) == {"10.96.0.1/32": (https, False), "192.168.0.5/32": (https, False)}
    assert ps.degraded == {}


def test_world_excludes_the_cluster_and_all_does_not() -> None:
    ps, c = _set({"egress": [{"toEntities": ["world"]}]}, NODES)
    entries = _entries(ps, c)
    assert entries["0.0.0.0/0"] == (ALL_PORTS, False) and entries["::/0"] == (ALL_PORTS, False)
    for cluster_ip in ("10.0.0.4", "10.0.0.53", "192.168.0.10", "192.168.0.11"):
        assert entries[f"{cluster_ip}/32"] == (None, False), cluster_ip  # holes: not the world
    everything, c = _set({"egress": [{"toEntities": ["all"]}]}, NODES)
    assert _entries(everything, c) == {"0.0.0.0/0": (ALL_PORTS, False), "::/0": (ALL_PORTS, False)}


def test_cluster_host_and_remote_node_entities() -> None:
    ps, c = _set({"egress": [{"toEntities": ["cluster"]}]}, NODES)
    assert set(_entries(ps, c)) == {"10.0.0.1/32", "10.0.0.4/32", "10.0.0.53/32", "192.168.0.10/32", "192.168.0.11/32"}
    host, c = _set({"egress": [{"toEntities": ["host", "remote-node"]}]}, NODES)
    assert set(_entries(host, c)) == {"192.168.0.10/32", "192.168.0.11/32"}


# -- egressDeny and icmps --------------------------------------------------------------------

def test_egress_deny_overrides_every_allowance_inside_it() -> None:
    ps, c = _set({"egress": [{"toEntities": ["all"]}, {"toEndpoints": [{"matchLabels": {"app": "db"}}]}],
                  "egressDeny": [{"toCIDRSet": [{"cidr": "10.0.0.0/24", "except": ["10.0.0.53/32"]}]}]}, NODES)
    entries = _entries(ps, c)
    assert entries["10.0.0.0/24"] == (None, True)
    assert entries["10.0.0.4/32"] == (None, True)  # the db pod is allowed by a rule, and denied: denied
    assert entries["0.0.0.0/0"] == (ALL_PORTS, False)
    assert entries.get("10.0.0.53/32", (ALL_PORTS, False)) == (ALL_PORTS, False)


def test_egress_deny_alone_polices_and_port_deny_is_widened_and_reported() -> None:
    ps, c = _set({"egressDeny": [{"toCIDR": ["192.0.2.0/24"], "toPorts": [{"ports": [{"port": "25"}]}]}]})
    assert ps.is_policed(c)  # Cilium: a deny section makes egress default-deny too
    assert _entries(ps, c) == {"192.0.2.0/24": (None, True)}
    assert "denies every port" in next(iter(ps.degraded.values()))[0]


def test_egress_deny_on_an_unknown_entity_denies_everything() -> None:
    ps, c = _set({"egress": [{"toEntities": ["all"]}], "egressDeny": [{"toEntities": ["kube-apiserver"]}]})
    entries = _entries(ps, c)
    assert entries["0.0.0.0/0"] == (None, True) and entries["::/0"] == (None, True)


def test_icmps_allow_their_types_only() -> None:
    ps, c = _set({"egress": [{"toCIDR": ["192.0.2.0/24"], "icmps": [{"fields": [{"type": 8}, {"type": "EchoRequest", "family": "IPv6"}]}]}]})
    (l4, deny) = _entries(ps, c)["192.0.2.0/24"]
    assert not deny and l4 == L4(False, (PortRange(8, 8, 1), PortRange(128, 128, 58)))
    assert l4.covers(8, 1) and not l4.covers(0, 1) and not l4.covers(8, 6)


# -- learned addresses are shared by selector ------------------------------------------------

def test_learned_addresses_go_to_every_pod_whose_to_fqdns_select_the_name() -> None:
    spec = {"egress": [{"toFQDNs": [{"matchPattern": "*.example.com"}], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]}
    other = {"endpointSelector": {"matchLabels": {"app": "db"}},
             "egress": [{"toFQDNs": [{"matchName": "api.example.com"}]}]}
    policies = [parse_policy(_cnp(spec), "t"), parse_policy({**_cnp({}), "spec": other}, "t")]
    ps = PolicySet(policies, PODS)
    learners = dict(ps.fqdn_learners("api.example.com"))
    assert learners == {("10.0.0.1",): L4(False, (PortRange(443, 443, 6),)), ("10.0.0.4",): ALL_PORTS}
    assert dict(ps.fqdn_learners("www.example.com")) == {("10.0.0.1",): L4(False, (PortRange(443, 443, 6),))}
    assert ps.fqdn_learners("example.org") == ()
    assert ipaddress.ip_address("10.0.0.1")
