"""The proxy's servers are bounded: real sockets on loopback against a real DnsProxy (TCP
DNS) and the real health server. Caps per client and in all, the idle and per-message
deadlines however slowly a client drips, and client resets counted, never printed."""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Iterator

import dns.message
import pytest
import yaml

from dnsproxy.bounded import ServerLimits
from dnsproxy.health import HealthServer
from dnsproxy.server import DnsProxy, ProxyConfig
from dnsproxy.supervise import Supervisor

LIMITS = ServerLimits(max_connections=6, max_per_client=3, idle_timeout_s=0.6, request_timeout_s=0.6)


@pytest.fixture
def tcp(tmp_path: Path) -> Iterator[tuple[DnsProxy, tuple[str, int]]]:
    if os.geteuid() != 0:
        pytest.skip("transparent sockets need CAP_NET_ADMIN")
    (tmp_path / "pol").mkdir()
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump({"pods": []}))
    proxy = DnsProxy(ProxyConfig(str(tmp_path / "pol"), str(tmp_path / "pods.yaml"), ("127.0.0.1", 9),
                                 listen=("127.0.0.1", 0), upstream_timeout_s=0.3, tcp_limits=LIMITS), None, Supervisor())
    proxy.reload()
    proxy.serve()
    yield proxy, proxy._servers[0].server_address[:2]  # type: ignore[misc]
    proxy.shutdown()


def _closed(s: socket.socket, within: float) -> bool:
    """Whether the server closes ``s`` within ``within`` seconds."""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _wait(pred: object, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_idle_and_slow_drip_connections_are_cut_at_their_deadlines(tcp: tuple[DnsProxy, tuple[str, int]]) -> None:
    proxy, addr = tcp
    counters = proxy.server_counters()[0]
    idle = socket.create_connection(addr)
    assert _closed(idle, 3)  # nothing sent: cut after the idle timeout
    drip = socket.create_connection(addr)
    wire = dns.message.make_query("a.test", "A").to_wire()
    msg = struct.pack("!H", len(wire)) + wire
    started = time.monotonic()
    for b in msg:  # one byte every 0.1 s: each read is quick, the message as a whole too slow
        try:
            drip.send(bytes([b]))
        except OSError:
            break
        time.sleep(0.1)
    assert _closed(drip, 3) and time.monotonic() - started < 0.6 + 0.6 + 1.5
    _wait(lambda: counters.errors["timeout"] >= 2)
    # A well-behaved client on a fresh connection is answered.
    ok = socket.create_connection(addr)
    ok.settimeout(3)
    ok.sendall(msg)
    (n,) = struct.unpack("!H", ok.recv(2))
    assert dns.message.from_wire(ok.recv(n)).id == dns.message.from_wire(wire).id
    for s in (idle, drip, ok):
        s.close()


def test_connections_beyond_the_per_client_cap_are_closed_at_once_and_counted(
        tcp: tuple[DnsProxy, tuple[str, int]]) -> None:
    proxy, addr = tcp
    counters = proxy.server_counters()[0]
    held = [socket.create_connection(addr) for _ in range(3)]
    _wait(lambda: counters.open == 3)
    extra = socket.create_connection(addr)
    assert _closed(extra, 1)  # at the cap: closed without waiting for the idle timeout
    assert counters.errors["rejected"] == 1
    for s in held + [extra]:
        s.close()
    _wait(lambda: counters.open == 0)


def test_client_resets_are_counted_not_printed(tcp: tuple[DnsProxy, tuple[str, int]],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    proxy, addr = tcp
    counters = proxy.server_counters()[0]
    s = socket.create_connection(addr)
    s.send(b"\x00\x40\x12")  # part of a message, then an RST
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    _wait(lambda: counters.errors["reset"] == 1)
    assert "Traceback" not in capsys.readouterr().err


def test_the_health_server_cuts_slow_clients_and_caps_connections() -> None:
    health = HealthServer("127.0.0.1", 0, {"/healthz": lambda: (True, {})},
                          limits=ServerLimits(max_connections=4, max_per_client=2, idle_timeout_s=0.5,
                                              request_timeout_s=1.0))
    health.start()
    try:
        slow = socket.create_connection(health.address)
        for b in b"GET /healthz HTTP/1.1\r\n":  # a header line that never ends, a byte at a time
            try:
                slow.send(bytes([b]))
            except OSError:
                break
            time.sleep(0.1)
        assert _closed(slow, 3)  # cut at the request deadline, though each byte came in time
        held = [socket.create_connection(health.address) for _ in range(2)]
        _wait(lambda: health.counters.open == 2)
        extra = socket.create_connection(health.address)
        assert _closed(extra, 1)
        assert health.counters.errors["rejected"] == 1
        for s in held + [extra, slow]:
            s.close()
    finally:
        health.shutdown()
