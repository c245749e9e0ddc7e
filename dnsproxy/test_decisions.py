"""DnsProxy's decisions on real messages, with a real UDP resolver on loopback that records
what reaches it: names refused without asking it, shape rejections never forwarded, the
resolver binding (a query to a resolver the DNS rule does not select is dropped, never
forwarded), and learned addresses shared by every pod whose toFQDNs select the name."""
from __future__ import annotations

import random
import socket
import threading
from pathlib import Path
from typing import Iterator

import dns.message
import dns.rcode
import dns.rrset
import pytest
import yaml

from dnsproxy.server import DnsProxy, ProxyConfig, answer_ips
from flowtel.lib.policy import L4, PortRange


class _Resolver:
    """A UDP DNS server on loopback answering A queries with 192.0.2.7; keeps every question."""

    def __init__(self) -> None:
        # Port 53, as a DNS rule names it, on a loopback address of its own (other suites run
        # at the same time): 127.53.x.y, retried if taken.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(50):
            try:
                self.sock.bind((f"127.53.{random.randrange(256)}.{random.randrange(1, 255)}", 53))
                break
            except OSError:
                continue
        else:
            raise RuntimeError("no free 127.53.x.y:53 for the test resolver")
        self.sock.settimeout(0.1)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.seen.append(data)
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.7"))
            self.sock.sendto(r.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def resolver() -> Iterator[_Resolver]:
    r = _Resolver()
    yield r
    r.close()


class _Learner:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str], int, float, L4]] = []

    def learn(self, pod_ips: list[str], dst_ips: list[str], ttl_s: int, grace_s: float, l4: L4) -> None:
        self.calls.append((pod_ips, dst_ips, ttl_s, grace_s, l4))


def _cnp(name: str, selector: dict, egress: list) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"endpointSelector": {"matchLabels": selector}, "egress": egress}}


def _proxy(tmp_path: Path, resolver_ip: str, *, rcode: int = dns.rcode.REFUSED) -> tuple[DnsProxy, _Learner]:
    dns_rule = {"toCIDR": [f"{resolver_ip}/32"],
                "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}],
                             "rules": {"dns": [{"matchPattern": "*.allowed.test"}, {"matchName": "exact.test"}]}}]}
    (tmp_path / "pol").mkdir(exist_ok=True)
    (tmp_path / "pol" / "p.yaml").write_text(yaml.safe_dump_all([
        _cnp("client", {"app": "client"}, [dns_rule, {"toFQDNs": [{"matchPattern": "*.allowed.test"}],
                                                      "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]),
        _cnp("batch", {"app": "batch"}, [{"toFQDNs": [{"matchName": "api.allowed.test"}]}]),
    ]))
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump({"pods": [
        {"name": "client", "namespace": "shop", "ips": ["10.0.0.1"], "labels": {"app": "client"}},
        {"name": "batch", "namespace": "shop", "ips": ["10.0.0.2"], "labels": {"app": "batch"}},
    ]}))
    learner = _Learner()
    # No --upstream: each query goes to the resolver the pod asked (orig_dst), as redirected.
    proxy = DnsProxy(ProxyConfig(str(tmp_path / "pol"), str(tmp_path / "pods.yaml"), None, refuse_rcode=rcode,
                                 upstream_timeout_s=0.5), learner)
    proxy.reload()
    return proxy, learner


def _ask(proxy: DnsProxy, wire: bytes, to: tuple[str, int], client: str = "10.0.0.1") -> dns.message.Message | None:
    out = proxy.handle(wire, client, tcp=False, orig_dst=to)
    return None if out is None else dns.message.from_wire(out)


def test_refused_names_never_reach_the_resolver(tmp_path: Path, resolver: _Resolver) -> None:
    for rcode in (dns.rcode.REFUSED, dns.rcode.NXDOMAIN):
        proxy, _ = _proxy(tmp_path, resolver.address[0], rcode=rcode)
        before = len(resolver.seen)
        resp = _ask(proxy, dns.message.make_query("blocked.test", "A").to_wire(), resolver.address)
        assert resp is not None and resp.rcode() == rcode
        assert len(resolver.seen) == before and proxy.stats.refused == 1
        resp = _ask(proxy, dns.message.make_query("x.allowed.test", "A").to_wire(), resolver.address)
        assert resp is not None and resp.rcode() == dns.rcode.NOERROR and len(resolver.seen) == before + 1


def test_smuggled_names_are_never_forwarded(tmp_path: Path, resolver: _Resolver) -> None:
    from dnsproxy.test_wire import _two_questions, _update, _with  # the same messages as the wire table

    proxy, learner = _proxy(tmp_path, resolver.address[0])
    for make, rcode in ((_two_questions, dns.rcode.FORMERR), (_update, dns.rcode.REFUSED),
                        (lambda: _with("additional"), dns.rcode.FORMERR)):
        resp = _ask(proxy, make(), resolver.address)
        assert resp is not None and resp.rcode() == rcode and not resp.question
    response = dns.message.make_response(dns.message.make_query("x.allowed.test", "A")).to_wire()
    assert _ask(proxy, response, resolver.address) is None  # QR=1: dropped, no answer
    assert resolver.seen == [] and learner.calls == []
    assert proxy.stats.rejected == {"question_count": 1, "opcode": 1, "records": 1, "response": 1}


def test_queries_to_a_resolver_the_rule_does_not_select_are_dropped(tmp_path: Path, resolver: _Resolver) -> None:
    # The rule allows 127.0.0.2 only; the pod asks its own resolver for an allowed name.
    proxy, learner = _proxy(tmp_path, "127.0.0.2")
    assert _ask(proxy, dns.message.make_query("x.allowed.test", "A").to_wire(), resolver.address) is None
    assert resolver.seen == [] and learner.calls == [] and proxy.stats.resolver_denied == 1
    # TCP to the allowed resolver: the rule names UDP only.
    assert proxy.handle(dns.message.make_query("x.allowed.test", "A").to_wire(), "10.0.0.1", tcp=True,
                        orig_dst=("127.0.0.2", 53)) is None
    assert proxy.stats.queries[("resolver_denied", "tcp")] == 1


def test_learned_addresses_are_shared_by_selector(tmp_path: Path, resolver: _Resolver) -> None:
    proxy, learner = _proxy(tmp_path, resolver.address[0])
    resp = _ask(proxy, dns.message.make_query("api.allowed.test", "A").to_wire(), resolver.address)
    assert resp is not None and resp.rcode() == dns.rcode.NOERROR
    # The client asked; batch selects the same name with its own toFQDNs, so it learns it too.
    got = {tuple(pod): (dst, l4) for pod, dst, _, _, l4 in learner.calls}
    assert got == {("10.0.0.1",): (["192.0.2.7"], L4(False, (PortRange(443, 443, 6),))),
                   ("10.0.0.2",): (["192.0.2.7"], L4(True))}
    learner.calls.clear()
    _ask(proxy, dns.message.make_query("www.allowed.test", "A").to_wire(), resolver.address)
    assert [c[0] for c in learner.calls] == [["10.0.0.1"]]  # batch's selector does not select it


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
