"""The DNS redirect end to end: any resolver address, IPv4 and IPv6, UDP and TCP, forwarded to
the resolver the pod asked (issue 8). `flowtel dnsproxy` runs without ``--upstream``.

Pods (all dual-stack): "dns-a" and "dns-b", two dnsmasq resolvers answering the same names
with DIFFERENT addresses ("web-a"'s and "web-b"'s), so every answer names the resolver that
produced it; "web-a", "web-b" (TCP sinks); "client" (policed: `*.allowed.test` only);
"free" (no policy). Truth: what dig in the client sees (answers, rcode, and that it took the
answer at all: dig drops one from an unexpected source address), each dnsmasq's query log
(who asked what), the pinned allow map, the redirect's own drop counter, first-SYN connects.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from testbed import Pod, Testbed
from tests.integration.test_fqdn_policy_e2e import WEB_PORT, Proxy, connect, datapath_view  # noqa: F401 (fixture)

pytestmark = pytest.mark.kernel

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {role: dns}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}]
  - toFQDNs: [{matchPattern: "*.allowed.test"}]
    toPorts: [{ports: [{port: "%d", protocol: TCP}]}]
""" % WEB_PORT

NAME, DENIED = "api.allowed.test", "api.blocked.test"

# The module's proxy has a tproxy mark, route table and rule priority of its own. The defaults
# are shared by every proxy on the machine (a concurrent run's, a benchmark's): with them, such
# a proxy could restore the rule this module deletes before this module's proxy saw it gone
# (the restore check then waits in vain), or be mid-restore while the rule is checked, and this
# module's deletion would black-hole that run's DNS meanwhile. The bits are clear of the
# default (0x40), bench/dnsproxy.py's (0x20) and the CNIs' (see dnsproxy/redirect.py); two
# concurrent runs may still draw the same bit, which test_uninstall_removes_the_redirect allows.
_MARK_BITS = (0x1, 0x2, 0x4, 0x8, 0x10, 0x1000, 0x2000)
MARK = _MARK_BITS[os.getpid() % len(_MARK_BITS)]
ROUTE_TABLE = 0xF1D00000 + os.getpid() % 0x10000  # a table per run: its rule is this run's alone
RULE_PRIORITY = 91 + os.getpid() % 400
RULE = ("fwmark", f"{MARK:#x}/{MARK:#x}", "lookup", str(ROUTE_TABLE), "priority", str(RULE_PRIORITY))


def dig(pod: Pod, server: str, name: str, qtype: str = "A", *, tcp: bool = False) -> tuple[str, list[str]]:
    """(rcode or TIMEOUT, the answer's addresses of ``qtype``) as the pod's dig saw them."""
    argv = ["dig", "+time=2", "+tries=1", f"@{server}", name, qtype]
    if tcp:
        argv.append("+tcp")
    out = pod.exec(argv, check=False, timeout=15).stdout
    status = out.split("status: ", 1)[1].split(",", 1)[0] if "status: " in out else "TIMEOUT"
    answers = []
    if "ANSWER SECTION:" in out:
        for line in out.split("ANSWER SECTION:", 1)[1].splitlines()[1:]:
            if not line.strip() or line.startswith(";"):
                break
            fields = line.split()
            if fields[3] == qtype:
                answers.append(fields[4])
    return status, answers


class Bed:
    def __init__(self, tb: Testbed, tmp: Path) -> None:
        self.tb = tb
        self.dns_a = tb.add_pod("dns-a", ipv6=True)
        self.dns_b = tb.add_pod("dns-b", ipv6=True)
        self.web_a = tb.add_pod("web-a", ipv6=True)
        self.web_b = tb.add_pod("web-b", ipv6=True)
        self.client = tb.add_pod("client", ipv6=True)
        self.free = tb.add_pod("free", ipv6=True)
        self.log_a, self.log_b = tmp / "dns-a.log", tmp / "dns-b.log"
        for pod, web, log in ((self.dns_a, self.web_a, self.log_a), (self.dns_b, self.web_b, self.log_b)):
            tb.start_dnsmasq(pod, hosts={NAME: [web.ipv4, web.ipv6],  # type: ignore[list-item]
                                         DENIED: [web.ipv4]}, log_path=str(log))
        for web in (self.web_a, self.web_b):
            tb.start_tcp_sink(web, WEB_PORT)
        self.policies = tmp / "policies"
        self.policies.mkdir()
        (self.policies / "client.yaml").write_text(POLICY)
        self.service_ip = str(tb.ipv4_network.network_address + 250)  # no pod has it: a ClusterIP stand-in
        self.services_file = tmp / "services.yaml"
        self.services_file.write_text(yaml.safe_dump({"services": [{
            "metadata": {"name": "kube-dns", "namespace": "default"},
            "spec": {"clusterIP": self.service_ip, "selector": {"role": "dns"},
                     "ports": [{"port": 53, "protocol": "UDP", "targetPort": 53},
                               {"port": 53, "protocol": "TCP", "targetPort": 53}]}}]}))
        self.pods_file = tmp / "pods.yaml"
        self.pods_file.write_text(yaml.safe_dump({"pods": [
            {"name": p.name, "namespace": "default", "ips": [p.ipv4, p.ipv6],
             "labels": {"app": p.name, **({"role": "dns"} if p.name.startswith("dns") else {})}}
            for p in (self.dns_a, self.dns_b, self.web_a, self.web_b, self.client, self.free)]}))

    def clear_logs(self) -> None:
        self.log_a.write_text("")
        self.log_b.write_text("")


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    Testbed.cleanup_stale()
    with Testbed() as tb:
        yield Bed(tb, tmp_path_factory.mktemp("fqdnredirect"))


@pytest.fixture(scope="module")
def proxy(bed: Bed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One proxy for the module (its start compiles the datapath: seconds), with no --upstream."""
    # The cluster DNS Service (test_service_ip_resolver_behind_kube_proxy_dnat): its ClusterIP
    # is a resolver the DNS rule allows because it allows every backend (role=dns).
    p = Proxy(bed, tmp_path_factory.mktemp("fqdnredirect-proxy"), upstream=None,  # type: ignore[arg-type]
              extra=("--services", str(bed.services_file)), route=(MARK, ROUTE_TABLE, RULE_PRIORITY))
    try:
        yield p
    finally:
        p.close()
        # uninstall keeps the rules and routes while another table marks with the same bit (a
        # concurrent run that drew it too); this run's table is its own, so remove it anyway.
        for family in ("-4", "-6"):
            subprocess.run(["ip", family, "rule", "del", *RULE], capture_output=True)
            subprocess.run(["ip", family, "route", "flush", "table", str(ROUTE_TABLE)], capture_output=True)


def _queried(log: Path, name: str, client: Pod) -> bool:
    """Whether this resolver was asked ``name``, and by the proxy (never by the client itself)."""
    text = log.read_text()
    assert f"from {client.ipv4}" not in text and f"from {client.ipv6}" not in text, text
    return f"query[A] {name}" in text or f"query[AAAA] {name}" in text


def _listen(proxy: Proxy) -> str:
    return proxy.argv[proxy.argv.index("--listen") + 1].rsplit(":", 1)[0]


def test_ipv4_answer_comes_from_the_resolver_the_pod_asked(bed: Bed, proxy: Proxy, datapath_view: Any) -> None:
    view = datapath_view(proxy)
    c = bed.client
    bed.clear_logs()
    # Resolver A: its answer, learned for the client; resolver B never asked.
    assert dig(c, bed.dns_a.ipv4, NAME) == ("NOERROR", [bed.web_a.ipv4])
    assert _queried(bed.log_a, NAME, c) and not _queried(bed.log_b, NAME, c)
    learned = view.allowed_entries()
    assert (c.ipv4, bed.web_a.ipv4) in learned and (c.ipv4, bed.web_b.ipv4) not in learned
    assert connect(c, bed.web_a.ipv4)  # first SYN
    assert not connect(c, bed.web_b.ipv4)  # what only resolver B would have answered: not allowed yet
    # Resolver B, over TCP: B's answer, learned in turn.
    bed.clear_logs()
    assert dig(c, bed.dns_b.ipv4, NAME, tcp=True) == ("NOERROR", [bed.web_b.ipv4])
    assert _queried(bed.log_b, NAME, c) and not _queried(bed.log_a, NAME, c)
    assert (c.ipv4, bed.web_b.ipv4) in view.allowed_entries()
    assert connect(c, bed.web_b.ipv4)
    # And back to A over TCP, B over UDP: each answer from the resolver asked.
    assert dig(c, bed.dns_a.ipv4, NAME, tcp=True) == ("NOERROR", [bed.web_a.ipv4])
    assert dig(c, bed.dns_b.ipv4, NAME) == ("NOERROR", [bed.web_b.ipv4])
    # A denied name: REFUSED by the proxy over UDP and TCP, no resolver asked.
    bed.clear_logs()
    assert dig(c, bed.dns_a.ipv4, DENIED)[0] == "REFUSED"
    assert dig(c, bed.dns_b.ipv4, DENIED, tcp=True)[0] == "REFUSED"
    assert not _queried(bed.log_a, DENIED, c) and not _queried(bed.log_b, DENIED, c)
    # The flow log names the resolver the pod asked as the answer's source.
    flow = proxy.wait_flow(lambda f: f.get("l7", {}).get("dns", {}).get("query", "").startswith(NAME)
                           and f.get("IP", {}).get("source") == bed.dns_b.ipv4)
    assert flow["verdict"] == "FORWARDED" and flow["IP"]["destination"] == c.ipv4


def test_ipv6_dns_is_redirected_and_forwarded_to_the_resolver_asked(bed: Bed, proxy: Proxy,
                                                                     datapath_view: Any) -> None:
    view = datapath_view(proxy)
    c = bed.client
    assert c.ipv6 and bed.web_a.ipv6 and bed.web_b.ipv6 and bed.dns_a.ipv6 and bed.dns_b.ipv6
    bed.clear_logs()
    assert dig(c, bed.dns_a.ipv6, NAME, "AAAA") == ("NOERROR", [bed.web_a.ipv6])
    assert _queried(bed.log_a, NAME, c) and not _queried(bed.log_b, NAME, c)
    # Learned for every address of the pod (its IPv4 one too: the same pod may connect from either).
    learned = view.allowed_entries()
    assert (c.ipv6, bed.web_a.ipv6) in learned and (c.ipv4, bed.web_a.ipv6) in learned
    assert (c.ipv6, bed.web_b.ipv6) not in learned
    assert connect(c, bed.web_a.ipv6)
    assert not connect(c, bed.web_b.ipv6)
    # A records asked over IPv6, and the other resolver over IPv6 TCP.
    assert dig(c, bed.dns_a.ipv6, NAME, "A") == ("NOERROR", [bed.web_a.ipv4])
    bed.clear_logs()
    assert dig(c, bed.dns_b.ipv6, NAME, "AAAA", tcp=True) == ("NOERROR", [bed.web_b.ipv6])
    assert _queried(bed.log_b, NAME, c) and not _queried(bed.log_a, NAME, c)
    assert connect(c, bed.web_b.ipv6)
    # Denied over IPv6, UDP and TCP: REFUSED, no resolver asked.
    bed.clear_logs()
    assert dig(c, bed.dns_a.ipv6, DENIED, "AAAA")[0] == "REFUSED"
    assert dig(c, bed.dns_b.ipv6, DENIED, "A", tcp=True)[0] == "REFUSED"
    assert not _queried(bed.log_a, DENIED, c) and not _queried(bed.log_b, DENIED, c)
    # An unpoliced pod's IPv6 DNS is not redirected: dnsmasq sees the pod itself.
    bed.clear_logs()
    assert dig(bed.free, bed.dns_a.ipv6, DENIED) == ("NOERROR", [bed.web_a.ipv4])
    assert f"from {bed.free.ipv6}" in bed.log_a.read_text()


def test_query_to_the_proxy_itself_is_answered_without_a_loop(bed: Bed, proxy: Proxy) -> None:
    """No redirect (an unpoliced pod asking the proxy's address): there is no resolver to
    forward to; SERVFAIL at once (a loop would time out), counted as an upstream error. A
    policed pod's DNS to the proxy's address is dropped in the datapath: no DNS rule names it
    (as Cilium drops DNS to a resolver the DNS rule does not select)."""
    listen = _listen(proxy)
    before = proxy.log.read_text().count("no upstream for")
    t0 = time.monotonic()
    assert dig(bed.free, listen, NAME)[0] == "SERVFAIL"  # not redirected: an unpoliced pod
    assert time.monotonic() - t0 < 2
    assert dig(bed.client, listen, NAME, tcp=True)[0] == "TIMEOUT"  # dropped, never proxied
    deadline = time.monotonic() + 5
    while proxy.log.read_text().count("no upstream for") < before + 1:
        assert time.monotonic() < deadline, proxy.log.read_text()[-2000:]
        time.sleep(0.05)


def _no_proxy_drops(proxy: Proxy) -> int:
    out = subprocess.run(["nft", "-j", "list", "counter", "inet", proxy.nft_table, "no_proxy"],
                         capture_output=True, text=True, check=True).stdout
    return next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o)


def test_dns_never_escapes_while_the_proxy_is_down(bed: Bed, proxy: Proxy) -> None:
    c = bed.client
    assert dig(c, bed.dns_a.ipv4, NAME) == ("NOERROR", [bed.web_a.ipv4])
    proxy.kill()
    try:
        bed.clear_logs()
        dropped = _no_proxy_drops(proxy)
        # The redirect stays; with no proxy socket the queries are dropped, not delivered to
        # the resolver the pod asked (which would answer names the policy denies).
        assert dig(c, bed.dns_a.ipv4, DENIED)[0] == "TIMEOUT"
        assert dig(c, bed.dns_b.ipv6, DENIED, "AAAA")[0] == "TIMEOUT"
        assert not _queried(bed.log_a, DENIED, c) and not _queried(bed.log_b, DENIED, c)
        assert _no_proxy_drops(proxy) >= dropped + 2
    finally:
        proxy.start()
    assert dig(c, bed.dns_b.ipv6, NAME, "AAAA") == ("NOERROR", [bed.web_b.ipv6])
    assert dig(c, bed.dns_a.ipv4, DENIED)[0] == "REFUSED"


def test_service_ip_resolver_behind_kube_proxy_dnat(bed: Bed, proxy: Proxy) -> None:
    """The cluster DNS Service IP, DNATed to a resolver pod as kube-proxy does (nat prerouting,
    after the redirect's mangle-priority rule): the proxy reads and asks the endpoint, and the
    pod gets the answer from the Service IP it asked (dig rejects any other source)."""
    svc = bed.service_ip
    table = f"ftsvc{os.getpid()}"
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
        f"table ip {table} {{\n"
        f"  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n"
        f"    ip daddr {svc} meta l4proto {{ tcp, udp }} th dport 53 dnat to {bed.dns_b.ipv4}\n"
        f"  }}\n"
        f"}}\n"))
    try:
        bed.clear_logs()
        assert dig(bed.client, svc, NAME) == ("NOERROR", [bed.web_b.ipv4])
        assert dig(bed.client, svc, NAME, tcp=True) == ("NOERROR", [bed.web_b.ipv4])
        assert _queried(bed.log_b, NAME, bed.client) and not _queried(bed.log_a, NAME, bed.client)
        assert dig(bed.client, svc, DENIED)[0] == "REFUSED"
    finally:
        subprocess.run(["nft", "delete", "table", "ip", table], check=False, capture_output=True)


def test_policy_route_removed_under_the_proxy_is_restored(bed: Bed, proxy: Proxy) -> None:
    """Without its rule the marked queries would be black-holed (the forward path drops a packet
    that already has a socket); the proxy puts it back within a reload round."""
    rule = f"rule fwmark {MARK:#x} lookup {ROUTE_TABLE}"
    before = len(proxy.log.read_text())
    # The two deletions are two commands: a round that falls between them (a loaded machine
    # spaces them by more than a 0.2 s round) restores the IPv4 rule alone, and a query sent
    # before the next round is black-holed (dig: TIMEOUT). Spaced by more than a round here, so
    # that the test always has that case: both families must be back, each in its own right.
    subprocess.run(["ip", "-4", "rule", "del", *RULE], check=True)
    time.sleep(0.5)
    subprocess.run(["ip", "-6", "rule", "del", *RULE], check=True)

    def restored() -> bool:
        # The kernel's rule lists are the truth; the proxy's log says it was the proxy that put
        # them back (its own lines come just after its netlink requests: both are waited for).
        logged = proxy.log.read_text()[before:]
        return f"{rule} (IPv4)" in logged and f"{rule} (IPv6)" in logged and all(
            f"lookup {ROUTE_TABLE}" in subprocess.run(["ip", family, "rule"], capture_output=True, text=True).stdout
            for family in ("-4", "-6"))

    deadline = time.monotonic() + 10
    while not restored():
        assert time.monotonic() < deadline, proxy.log.read_text()[-2000:]
        time.sleep(0.05)
    assert dig(bed.client, bed.dns_a.ipv4, NAME) == ("NOERROR", [bed.web_a.ipv4])
    assert dig(bed.client, bed.dns_b.ipv6, NAME, "AAAA") == ("NOERROR", [bed.web_b.ipv6])


def test_uninstall_removes_the_redirect(bed: Bed, proxy: Proxy) -> None:
    """Last (it ends the module's proxy): table, policy rules and routes, both listen addresses."""
    listen = _listen(proxy)
    # The default IPv6 companion, spelled out here rather than taken from the code under test.
    listen6 = str(ipaddress.IPv6Address("fd62:2c24:1612:53::") + int(ipaddress.IPv4Address(listen)))

    def state() -> str:
        return "\n".join(subprocess.run(argv, capture_output=True, text=True).stdout for argv in (
            ["nft", "list", "tables"], ["ip", "-4", "rule"], ["ip", "-6", "rule"],
            ["ip", "-4", "route", "show", "table", str(ROUTE_TABLE)],
            ["ip", "-6", "route", "show", "table", str(ROUTE_TABLE)],
            ["ip", "addr", "show", "dev", "lo"]))

    def others_marking() -> list[str]:
        """Other proxies' tables that mark with this module's bit (a concurrent run that drew it)."""
        ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
        return [t for t, body in re.findall(r"^table inet (ftdnsproxy_\S+) \{(.*?)^\}", ruleset, re.M | re.S)
                if t != proxy.nft_table and f"meta mark | {MARK:#010x}" in body]

    before = state()
    others = others_marking()
    rule = f"fwmark {MARK:#x}/{MARK:#x} lookup {ROUTE_TABLE}"
    for present in (proxy.nft_table, rule, "local default dev lo", listen, listen6):
        assert present in before, (present, before)
    proxy.close()
    after = state()
    # The policy rule and route are kept while another proxy's table marks with the same bit (a
    # concurrent run that drew it), by design: uninstall cannot tell which table it routes.
    others += others_marking()
    shared = () if others else (f"lookup {ROUTE_TABLE}", "local default dev lo")
    for gone in (proxy.nft_table, *shared, f"inet {listen}/", f"inet6 {listen6}/"):
        assert gone not in after, (gone, after)
    # And the policed client's DNS is plain again: straight to the resolver it asked.
    bed.clear_logs()
    assert dig(bed.client, bed.dns_a.ipv4, DENIED) == ("NOERROR", [bed.web_a.ipv4])
    assert f"from {bed.client.ipv4}" in bed.log_a.read_text()
