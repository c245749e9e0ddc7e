"""The proxy's /metrics: real queries through DnsProxy.handle (a real UDP upstream on loopback,
a closed port for failures), then a real HTTP scrape of MetricsServer. The datapath side is a
stand-in here (its counters come from the kernel in tests/integration/test_fqdn_drops_e2e.py)."""
from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import dns.message
import dns.rcode
import dns.rrset
import pytest
import yaml

from dnsproxy.metrics import MetricsServer, proxy_points
from dnsproxy.server import DnsProxy, ProxyConfig
from flowtel.errors import StartError

POLICY = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p", "namespace": "shop"},
          "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                   "egress": [{"toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                                            "rules": {"dns": [{"matchPattern": "*.allowed.test"}]}}]}]}}


@pytest.fixture
def upstream() -> Iterator[tuple[str, int]]:
    """A UDP DNS server on loopback answering every A query with 192.0.2.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.1"))
            sock.sendto(r.to_wire(), peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield sock.getsockname()
    stop.set()
    t.join(2)
    sock.close()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proxy(tmp_path: Path, upstream: tuple[str, int]) -> DnsProxy:
    (tmp_path / "pol").mkdir(exist_ok=True)
    (tmp_path / "pol" / "p.yaml").write_text(yaml.safe_dump(POLICY))
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump({"pods": [
        {"name": "client", "namespace": "shop", "ips": ["10.0.0.1"], "labels": {"app": "client"}}]}))
    proxy = DnsProxy(ProxyConfig(str(tmp_path / "pol"), str(tmp_path / "pods.yaml"), upstream,
                                 upstream_timeout_s=0.3), None)
    proxy.reload()
    return proxy


def _datapath() -> SimpleNamespace:
    counters = {"allowed_fqdn": 3, "allowed_cidr": 0, "allowed_dns": 5, "allowed_reply": 0, "dropped": 7,
                "audit": 0, "events_lost": 0, "expired": 1}
    return SimpleNamespace(live_allowances=2, attached={4: "veth0"}, counters=lambda: counters,
                           denied_created=lambda: 4)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return resp.read().decode()


def test_metrics_count_what_the_proxy_decided(tmp_path: Path, upstream: tuple[str, int]) -> None:
    proxy = _proxy(tmp_path, upstream)
    ask = lambda name, tcp=False: dns.message.from_wire(  # noqa: E731
        proxy.handle(dns.message.make_query(name, "A").to_wire(), "10.0.0.1", tcp=tcp) or b"").rcode()
    assert ask("a.allowed.test") == dns.rcode.NOERROR
    assert ask("b.allowed.test") == dns.rcode.NOERROR
    assert ask("blocked.test") == dns.rcode.REFUSED
    assert ask("blocked.test", tcp=True) == dns.rcode.REFUSED
    assert proxy.handle(b"\x00\x01garbage-not-dns", "10.0.0.1", tcp=False) is not None  # FORMERR
    assert proxy.handle(b"\x00\x02\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03abc", "10.0.0.1", tcp=False) is not None
    proxy.config.upstream = ("127.0.0.1", _closed_port())
    assert ask("c.allowed.test") == dns.rcode.SERVFAIL  # ICMP port unreachable: a network error

    runner = SimpleNamespace(proxy=proxy, datapath=_datapath())
    server = MetricsServer("127.0.0.1", 0, lambda: proxy_points(runner))
    server.start()
    try:
        text = _scrape("http://%s:%d/metrics" % server.address)
    finally:
        server.shutdown()
    lines = set(text.splitlines())
    assert 'flowtel_dnsproxy_queries_total{protocol="udp",verdict="allowed"} 3' in lines
    assert 'flowtel_dnsproxy_queries_total{protocol="udp",verdict="refused"} 1' in lines
    assert 'flowtel_dnsproxy_queries_total{protocol="tcp",verdict="refused"} 1' in lines
    assert 'flowtel_dnsproxy_queries_total{protocol="udp",verdict="audit"} 0' in lines
    assert "flowtel_dnsproxy_malformed_queries_total 1" in lines
    assert 'flowtel_dnsproxy_queries_rejected_total{reason="malformed"} 1' in lines
    assert 'flowtel_dnsproxy_upstream_errors_total{kind="network"} 1' in lines
    assert 'flowtel_dnsproxy_upstream_errors_total{kind="timeout"} 0' in lines
    # Two answered queries: both latency histograms hold exactly those.
    assert "# TYPE flowtel_dnsproxy_added_latency_seconds histogram" in lines
    assert "flowtel_dnsproxy_added_latency_seconds_count 2" in lines
    assert 'flowtel_dnsproxy_upstream_latency_seconds_bucket{le="+Inf"} 2' in lines
    assert 'flowtel_dnsproxy_policies{state="accepted"} 1' in lines
    assert 'flowtel_dnsproxy_policies{state="rejected"} 0' in lines
    assert "flowtel_dnsproxy_policed_pods 1" in lines
    assert "flowtel_dnsproxy_learned_ips 2" in lines
    assert 'flowtel_dnsproxy_datapath_packets_total{decision="dropped"} 7' in lines
    assert "flowtel_dnsproxy_events_lost_total 0" in lines
    assert "# TYPE flowtel_dnsproxy_datapath_packets_total counter" in lines


def test_a_taken_port_is_a_start_error_naming_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(StartError, match="--metrics-listen"):
            MetricsServer("127.0.0.1", taken.getsockname()[1], lambda: [])
