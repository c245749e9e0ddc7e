"""The redirect's pieces without pods: forwarding to the resolver asked, the no-loop rule, the
socket ancillary data, the listen addresses, and the nft ruleset (checked by nft itself).
End to end (real pods, both families, UDP and TCP): tests/integration/test_fqdn_redirect_e2e.py.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import dns.message
import dns.rcode
import dns.rrset
import pytest
import yaml

from dnsproxy.redirect import LISTEN6_PREFIX, Redirect, RedirectConfig, default_listen6
from dnsproxy.server import DnsProxy, ProxyConfig, _orig_dst, _pktinfo


class _Resolver:
    """A UDP DNS server on loopback answering every A query with ``address``; counts queries."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            self.queries += 1
            q = dns.message.from_wire(data)
            resp = dns.message.make_response(q)
            resp.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", self.address))
            self.sock.sendto(resp.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def resolvers() -> Iterator[tuple[_Resolver, _Resolver]]:
    a, b = _Resolver("192.0.2.1"), _Resolver("192.0.2.2")
    yield a, b
    a.close()
    b.close()


def _proxy(tmp_path: Path, upstream: tuple[str, int] | None) -> DnsProxy:
    (tmp_path / "pol").mkdir(exist_ok=True)
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump({"pods": []}))
    proxy = DnsProxy(ProxyConfig(str(tmp_path / "pol"), str(tmp_path / "pods.yaml"), upstream,
                                 listen=("169.254.20.53", 53), listen6=("fd62:2c24:1612:53::a9fe:1435", 53),
                                 upstream_timeout_s=0.5), None)
    proxy.reload()
    return proxy


def _ask(proxy: DnsProxy, orig: tuple[str, int] | None) -> dns.message.Message:
    wire = dns.message.make_query("api.example.test", "A").to_wire()
    return dns.message.from_wire(proxy.handle(wire, "10.0.0.9", tcp=False, orig_dst=orig) or b"")


def _addresses(msg: dns.message.Message) -> list[str]:
    return [r.address for rrset in msg.answer for r in rrset]


def test_forwards_to_the_resolver_the_query_was_sent_to(tmp_path: Path, resolvers: tuple[_Resolver, _Resolver]) -> None:
    a, b = resolvers
    proxy = _proxy(tmp_path, None)
    assert _addresses(_ask(proxy, ("127.0.0.1", a.port))) == ["192.0.2.1"]
    assert _addresses(_ask(proxy, ("127.0.0.1", b.port))) == ["192.0.2.2"]
    assert (a.queries, b.queries) == (1, 1)


def test_upstream_overrides_the_resolver_asked(tmp_path: Path, resolvers: tuple[_Resolver, _Resolver]) -> None:
    a, b = resolvers
    proxy = _proxy(tmp_path, ("127.0.0.1", a.port))
    assert _addresses(_ask(proxy, ("127.0.0.1", b.port))) == ["192.0.2.1"]
    # The proxy's own address too: with an upstream there is somewhere to send it.
    assert _addresses(_ask(proxy, ("169.254.20.53", 53))) == ["192.0.2.1"]
    assert (a.queries, b.queries) == (2, 0)


@pytest.mark.parametrize("own", [("169.254.20.53", 53), ("fd62:2c24:1612:53::a9fe:1435", 53),
                                 ("FD62:2C24:1612:53:0::A9FE:1435", 53)])
def test_query_to_the_proxys_own_address_is_servfail_not_a_loop(tmp_path: Path, own: tuple[str, int]) -> None:
    proxy = _proxy(tmp_path, None)
    assert _ask(proxy, own).rcode() == dns.rcode.SERVFAIL
    assert proxy.stats.upstream_errors == 1
    assert _ask(proxy, None).rcode() == dns.rcode.SERVFAIL  # no destination known at all
    assert proxy.stats.upstream_errors == 2


def test_ancillary_data_round_trip() -> None:
    # struct sockaddr_in / sockaddr_in6 as the kernel puts them in IP(V6)_ORIGDSTADDR.
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 53) + socket.inet_pton(socket.AF_INET, "10.96.0.10") + bytes(8)
    v6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 53) + bytes(4)
          + socket.inet_pton(socket.AF_INET6, "fd00::a") + bytes(4))
    assert _orig_dst([(0, 20, v4)]) == ("10.96.0.10", 53)
    assert _orig_dst([(41, 74, v6)]) == ("fd00::a", 53)
    assert _orig_dst([(41, 50, b"\x00" * 8)]) is None  # another message: ignored
    level, kind, data = _pktinfo("10.96.0.10", False)
    assert (level, kind, len(data)) == (0, 8, 12) and data[4:8] == socket.inet_pton(socket.AF_INET, "10.96.0.10")
    level, kind, data = _pktinfo("fd00::a", True)
    assert (level, kind, len(data)) == (41, socket.IPV6_PKTINFO, 20) and data[:16] == socket.inet_pton(socket.AF_INET6, "fd00::a")


def test_listen_addresses() -> None:
    assert default_listen6("169.254.20.53") == "fd62:2c24:1612:53::a9fe:1435"
    assert default_listen6("169.254.53.7") != default_listen6("169.254.53.8")
    import ipaddress

    assert ipaddress.IPv6Address(default_listen6("169.254.20.53")) in LISTEN6_PREFIX
    ok = RedirectConfig("t", "lo:t", "169.254.20.53", default_listen6("169.254.20.53"))
    ok.validate()
    RedirectConfig("t", "lo:t", "169.254.20.53", None).validate()  # IPv4 only
    for bad, message in ((RedirectConfig("t", "lo:t", "fd00::1", None), "IPv4 address is expected"),
                         (RedirectConfig("t", "lo:t", "169.254.20.53", "10.0.0.1"), "IPv6 address is expected"),
                         (RedirectConfig("t", "lo:t", "169.254.20.53", None, port=5353), "must listen on port 53"),
                         (RedirectConfig("t", "lo:t", "169.254.20.53", None, mark=0x41), "one bit")):
        with pytest.raises(ValueError, match=message):
            bad.validate()


@pytest.mark.parametrize("listen6", ["fd62:2c24:1612:53::a9fe:1435", None])
@pytest.mark.parametrize("ifnames", [[], ["veth1", "veth2"]])
def test_ruleset_is_valid_nft(listen6: str | None, ifnames: list[str]) -> None:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("nft --check needs root and nftables")
    script = Redirect(RedirectConfig("ftredirect_check", "lo:t", "169.254.20.53", listen6)).ruleset(ifnames)
    assert ("tproxy ip6 to" in script) == (listen6 is not None)
    assert script.count("tproxy ip to") == 1 and "counter name no_proxy drop" in script
    res = subprocess.run(["nft", "--check", "-f", "-"], input=script, text=True, capture_output=True)
    assert res.returncode == 0, res.stderr
