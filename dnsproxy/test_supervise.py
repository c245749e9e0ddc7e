"""Every proxy thread is supervised: killing one fails /healthz at once and names it.

A real DnsProxy serves UDP and TCP on loopback (transparent sockets: root), a real
HealthServer answers /healthz from the supervisor. Each loop is killed by injecting a fault
into it (its selector closed, an exception in its poll step): faults a packet can no longer
cause, which is the point. A QR=1 datagram, the packet that used to kill the UDP loop, leaves
it serving.
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import dns.message
import dns.rcode
import pytest
import yaml

from dnsproxy.health import HealthServer
from dnsproxy.server import DnsProxy, ProxyConfig
from dnsproxy.supervise import Supervisor


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[DnsProxy, Supervisor, str]]:
    if os.geteuid() != 0:
        pytest.skip("transparent sockets need CAP_NET_ADMIN")
    (tmp_path / "pol").mkdir()
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump({"pods": []}))
    sup = Supervisor()
    # Upstream: a closed port (SERVFAIL at once); listen on an ephemeral loopback port.
    proxy = DnsProxy(ProxyConfig(str(tmp_path / "pol"), str(tmp_path / "pods.yaml"), ("127.0.0.1", 9),
                                 listen=("127.0.0.1", 0), upstream_timeout_s=0.5,
                                 flow_log=str(tmp_path / "flows.log")), None, sup)
    proxy.reload()
    proxy.serve()
    health = HealthServer("127.0.0.1", 0, {"/healthz": sup.check})
    health.start(sup)
    yield proxy, sup, "http://%s:%d/healthz" % health.address
    proxy.shutdown()
    health.shutdown()


def _healthz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_unhealthy(url: str, thread: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        code, body = _healthz(url)
        if code == 503:
            assert thread in body["dead_threads"], body
            return body
        time.sleep(0.05)
    raise AssertionError(f"/healthz stayed 200 after {thread} died")


def _udp_address(proxy: DnsProxy) -> tuple[str, int]:
    assert proxy._udp_loop is not None
    return proxy._udp_loop._listeners[0].sock.getsockname()[:2]


def test_a_response_packet_leaves_the_udp_loop_serving(served: tuple[DnsProxy, Supervisor, str]) -> None:
    proxy, sup, url = served
    addr = _udp_address(proxy)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(dns.message.make_response(dns.message.make_query("a.test", "A")).to_wire(), addr)
        s.sendto(dns.message.make_query("b.test", "A").to_wire(), addr)
        assert dns.message.from_wire(s.recv(4096)).rcode() == dns.rcode.SERVFAIL  # answered: the loop lives
    assert proxy.stats.rejected == {"response": 1}
    assert _healthz(url)[0] == 200


def test_killing_the_udp_loop_fails_healthz(served: tuple[DnsProxy, Supervisor, str]) -> None:
    proxy, sup, url = served
    assert _healthz(url)[0] == 200
    loop = proxy._udp_loop
    assert loop is not None
    loop._sel.close()  # the fault: its selector gone under it
    loop._wake_w.send(b"x")
    _wait_unhealthy(url, "dnsproxy-udp")


@pytest.mark.parametrize("thread", ["dnsproxy-tcp", "dnsproxy-flowlog"])
def test_killing_the_tcp_server_or_the_flow_log_writer_fails_healthz(served: tuple[DnsProxy, Supervisor, str],
                                                                    thread: str) -> None:
    proxy, sup, url = served

    def boom(*_: object) -> None:
        raise RuntimeError("injected fault")

    if thread == "dnsproxy-tcp":
        proxy._servers[0].service_actions = boom  # type: ignore[method-assign]
    else:
        assert proxy.flow_log is not None
        proxy.flow_log._drain = boom  # type: ignore[method-assign]
    body = _wait_unhealthy(url, thread)
    assert "injected fault" in body["dead_threads"][thread]


def test_a_thread_that_returns_while_serving_is_dead_too() -> None:
    sup = Supervisor()
    sup.start("dnsproxy-events", lambda: None).join(2)
    assert sup.check() == (False, {"dead_threads": {"dnsproxy-events": "returned"}})
    stopping = Supervisor()
    stopping.stopping = True
    stopping.start("dnsproxy-events", lambda: None).join(2)
    assert stopping.check() == (True, {})


def test_killing_the_metrics_or_the_health_server_is_seen() -> None:
    from dnsproxy.metrics import MetricsServer

    sup = Supervisor()
    metrics = MetricsServer("127.0.0.1", 0, lambda: [])
    health = HealthServer("127.0.0.1", 0, {"/healthz": sup.check})
    metrics.start(sup)
    health.start(sup)
    try:
        def boom() -> None:
            raise RuntimeError("injected fault")

        metrics._httpd.service_actions = boom  # type: ignore[method-assign]
        url = "http://%s:%d/healthz" % health.address
        body = _wait_unhealthy(url, "dnsproxy-metrics")
        assert "injected fault" in body["dead_threads"]["dnsproxy-metrics"]
        # The health server itself dying: nothing answers /healthz (the kubelet's probe fails),
        # and the supervisor says so to the proxy's main loop, which exits.
        health._httpd.service_actions = boom  # type: ignore[method-assign]
        deadline = time.monotonic() + 5
        while "dnsproxy-health" not in sup.dead():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        sup.stopping = True
        metrics.shutdown()
        health.shutdown()
