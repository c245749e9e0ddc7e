"""The UDP event loop on loopback (dnsproxy/udp.py): a real DnsProxy serving its transparent
socket, real DNS servers (dnspython on UDP sockets) as upstreams. End to end with pods, the
redirect and the allow map: dnsproxy/test_udp_loop.py."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import dns.message
import dns.rcode
import dns.rrset
import pytest
import yaml

from dnsproxy.server import DnsProxy, ProxyConfig
from dnsproxy.udp import UdpLoop, udp_listen_socket


class _HeldResolver:
    """Answers each A query with 192.0.2.<n> (n: the name's first label, ``h<n>``), but only
    once :meth:`release` is called: queries are held until then."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.released = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        held: list[tuple[bytes, tuple[str, int]]] = []
        self.sock.settimeout(0.05)
        while True:
            try:
                held.append(self.sock.recvfrom(4096))
                self.received += 1
            except TimeoutError:
                pass
            except OSError:
                return
            if self.released.is_set():
                for data, peer in held:
                    q = dns.message.from_wire(data)
                    resp = dns.message.make_response(q)
                    n = q.question[0].name.labels[0].decode()[1:]
                    resp.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", f"192.0.2.{n}"))
                    self.sock.sendto(resp.to_wire(), peer)
                held.clear()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[DnsProxy, tuple[str, int], _HeldResolver]]:
    if os.geteuid() != 0:
        pytest.skip("transparent sockets need CAP_NET_ADMIN")
    upstream = _HeldResolver()
    (tmp_path / "pol").mkdir()
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump({"pods": []}))
    listen = udp_listen_socket("127.0.0.1", 0)
    addr = listen.getsockname()[:2]
    port = getattr(request, "param", {}).get("upstream_port", upstream.port)
    proxy = DnsProxy(ProxyConfig(str(tmp_path / "pol"), str(tmp_path / "pods.yaml"), ("127.0.0.1", port),
                                 listen=addr, upstream_timeout_s=0.5), None)
    proxy.reload()
    loop = UdpLoop(proxy, [(listen, addr)], 0.5, max_in_flight=2)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    yield proxy, addr, upstream
    loop.stop()
    thread.join(5)
    upstream.close()
    assert not thread.is_alive()


def _client(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(addr)
    s.settimeout(3)
    return s


def test_beyond_max_in_flight_queries_wait_in_the_buffer_then_all_are_answered(
        served: tuple[DnsProxy, tuple[str, int], _HeldResolver]) -> None:
    proxy, addr, upstream = served
    clients = [_client(addr) for _ in range(5)]
    for i, c in enumerate(clients):
        q = dns.message.make_query(f"h{i + 1}.test", "A")
        q.id = 1000 + i
        c.send(q.to_wire())
    time.sleep(0.2)
    # Two queries in flight (the limit); the loop stopped reading, so three wait in the socket.
    assert upstream.received == 2
    upstream.release()
    for i, c in enumerate(clients):
        resp = dns.message.from_wire(c.recv(4096))
        assert resp.id == 1000 + i and [r.address for rr in resp.answer for r in rr] == [f"192.0.2.{i + 1}"]
    assert upstream.received == 5 and proxy.stats.allowed == 5 and proxy.stats.upstream_errors == 0


def test_unanswered_query_is_servfail_after_the_timeout_counted(
        served: tuple[DnsProxy, tuple[str, int], _HeldResolver]) -> None:
    proxy, addr, upstream = served
    c = _client(addr)
    t0 = time.monotonic()
    c.send(dns.message.make_query("h7.test", "A").to_wire())
    assert dns.message.from_wire(c.recv(4096)).rcode() == dns.rcode.SERVFAIL
    assert 0.45 <= time.monotonic() - t0 < 2
    assert proxy.stats_snapshot().upstream_error_kinds == {"timeout": 1}
    # A late answer to it is not sent on (the query's socket is gone); the next query is served.
    upstream.release()
    c.send(dns.message.make_query("h8.test", "A").to_wire())
    resp = dns.message.from_wire(c.recv(4096))
    assert [r.address for rr in resp.answer for r in rr] == ["192.0.2.8"]


@pytest.mark.parametrize("served", [{"upstream_port": 9}], indirect=True)  # discard: nothing listens on loopback
def test_refused_upstream_is_servfail_at_once(served: tuple[DnsProxy, tuple[str, int], _HeldResolver]) -> None:
    proxy, addr, _ = served
    c = _client(addr)
    t0 = time.monotonic()
    c.send(dns.message.make_query("h1.test", "A").to_wire())
    assert dns.message.from_wire(c.recv(4096)).rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - t0 < 0.4  # the ICMP port unreachable, not the 0.5 s timeout
    assert proxy.stats_snapshot().upstream_error_kinds == {"network": 1}
