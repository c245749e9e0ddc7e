"""The testbed against the real kernel: quiet, routed, served, and cleaned up."""
from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from testbed import (
    DNS_PROBE_NAME,
    GUARD_ROUTE_PROTO,
    LinkStats,
    Pod,
    Testbed,
    TestbedError,
    capture,
    send_ping,
    send_tcp,
    send_udp,
)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[1]
ETH_IPV4_ICMP_ECHO = 14 + 20 + 8 + 56  # frame of a ping(8)-sized echo request or reply
ETH_IPV6_ICMP_ECHO = 14 + 40 + 8 + 56


def _ip_json(*args: str) -> list[dict]:
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def _host_links() -> set[str]:
    return {link["ifname"] for link in _ip_json("link", "show")}


def _netns() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def _guard_routes(family: str) -> list[dict]:
    return _ip_json(family, "route", "show", "type", "unreachable", "proto", str(GUARD_ROUTE_PROTO))


def _process_gone(pid: int) -> bool:
    # An orphan re-parented to a pid 1 that does not reap stays a zombie: gone all the same.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    Testbed.cleanup_stale()
    with Testbed() as tb:
        tb.add_pod("client")
        tb.add_pod("server")
        yield tb


def _stats(tb: Testbed, *pods: Pod) -> list[LinkStats]:
    return [tb.link_stats(p) for p in pods]


def test_pods_are_quiet_and_counters_exact(bed: Testbed) -> None:
    client, server = bed.pods["client"], bed.pods["server"]
    n = 5
    with capture(client) as frames:
        time.sleep(2.0)
        idle_end = time.time()
        before = _stats(bed, client, server)
        there = send_ping(client, server.ipv4, n, interval=0.2)
        mid = _stats(bed, client, server)
        back = send_ping(server, client.ipv4, n, interval=0.2)
        after = _stats(bed, client, server)
    assert (there.received, back.received) == (n, n)

    idle = [f for f in frames if float(f.split()[0]) < idle_end]
    assert idle == [], f"frames on an idle host veth: {idle}"
    # The capture saw the pings, so an empty idle window means quiet, not a deaf tcpdump.
    busy = frames[len(idle):]
    assert len(busy) == 4 * n, busy
    assert sum("ICMP echo request" in f for f in busy) == 2 * n
    assert all("ARP" not in f and "IP6" not in f for f in busy)

    # Host veth rx = what the pod sent, tx = what the host delivered to it; one frame each
    # way per echo, on both veths, and not a frame more.
    for delta in (mid[0] - before[0], mid[1] - before[1], after[0] - mid[0], after[1] - mid[1]):
        assert delta == LinkStats(rx_packets=n, rx_bytes=n * ETH_IPV4_ICMP_ECHO,
                                  tx_packets=n, tx_bytes=n * ETH_IPV4_ICMP_ECHO)


def test_tcp_transfer_reaches_sink(bed: Testbed) -> None:
    client, server = bed.pods["client"], bed.pods["server"]
    sink = bed.start_tcp_sink(server, 5001)
    before = bed.link_stats(server)
    sent = send_tcp(client, server.ipv4, 5001, 1_234_567)
    delta = bed.link_stats(server) - before

    assert (sent.src_ip, sent.dst_ip, sent.dst_port) == (client.ipv4, server.ipv4, 5001)
    records = [r for r in sink.records() if r["peer_port"] == sent.src_port]
    assert records == [{"event": "closed", "peer": client.ipv4, "peer_port": sent.src_port,
                        "bytes": 1_234_567}]
    assert delta.tx_bytes > 1_234_567  # crossed the server's veth, headers on top
    assert delta.rx_packets > 0  # ACKs back


def test_udp_datagrams_counted_exactly(bed: Testbed) -> None:
    client, server = bed.pods["client"], bed.pods["server"]
    sink = bed.start_udp_sink(server, 5002)
    before = _stats(bed, client, server)
    sent = send_udp(client, server.ipv4, 5002, count=20, size=300)
    records = sink.wait_records(20)
    after = _stats(bed, client, server)

    assert len(records) == 20
    assert {(r["peer"], r["peer_port"], r["bytes"]) for r in records} == {(client.ipv4, sent.src_port, 300)}
    frame = 14 + 20 + 8 + 300
    assert after[0] - before[0] == LinkStats(rx_packets=20, rx_bytes=20 * frame)
    assert after[1] - before[1] == LinkStats(tx_packets=20, tx_bytes=20 * frame)


def test_dnsmasq_answers_configured_names_and_nxdomain(bed: Testbed, tmp_path: Path) -> None:
    client, server = bed.pods["client"], bed.pods["server"]
    log = tmp_path / "dnsmasq.log"
    bed.start_dnsmasq(server, hosts={"web.flowtel.test": ["198.51.100.7", "198.51.100.8", "fd00:f7::7"]},
                      log_path=str(log), ttl=120)

    def dig(*args: str) -> str:
        return client.exec(["dig", "+time=2", "+tries=1", f"@{server.ipv4}", *args]).stdout

    a = dig("+noall", "+answer", "web.flowtel.test", "A")
    assert sorted(line.split()[-1] for line in a.splitlines()) == ["198.51.100.7", "198.51.100.8"]
    assert all(line.split()[1] == "120" for line in a.splitlines())
    assert dig("+short", "+tcp", "web.flowtel.test", "AAAA").split() == ["fd00:f7::7"]
    assert "status: NXDOMAIN" in dig("unknown.flowtel.test", "A")
    nodata = dig("web.flowtel.test", "MX")
    assert "status: NOERROR" in nodata and "ANSWER: 0" in nodata

    queries = [line for line in log.read_text().splitlines() if "query[" in line]
    assert len(queries) == 4, queries
    assert DNS_PROBE_NAME not in log.read_text()
    assert all(f"from {client.ipv4}" in q for q in queries)

    # Listening on the pod address only: nothing on the wildcard or loopback.
    listening = server.exec(["ss", "-H", "-lntu", "sport", "= :53"]).stdout.split("\n")
    local = {line.split()[4] for line in listening if line.strip()}
    assert local == {f"{server.ipv4}:53"}


def test_ipv6_pods_are_quiet_and_routed() -> None:
    with Testbed() as tb:
        a, b = tb.add_pod("a6", ipv6=True), tb.add_pod("b6", ipv6=True)
        assert a.ipv6 is not None and b.ipv6 is not None
        assert ipaddress.ip_address(a.ipv6) in ipaddress.ip_network("fd00:f7::/32")
        # Counters start at creation: anything the kernel sent on its own in the first
        # seconds (MLD reports are what IPv6 would send) shows up here.
        time.sleep(1.5)
        assert _stats(tb, a, b) == [LinkStats(), LinkStats()]
        n = 4
        assert send_ping(a, b.ipv6, n).received == n
        assert send_ping(a, b.ipv4, n).received == n
        frames = n * (ETH_IPV6_ICMP_ECHO + ETH_IPV4_ICMP_ECHO)
        for stats in _stats(tb, a, b):
            assert stats == LinkStats(rx_packets=2 * n, rx_bytes=frames, tx_packets=2 * n, tx_bytes=frames)
        sink = tb.start_tcp_sink(b, 80)
        sent = send_tcp(a, b.ipv6, 80, 10_000)
        assert sink.records() == [{"event": "closed", "peer": a.ipv6, "peer_port": sent.src_port,
                                   "bytes": 10_000}]


_SEND_ONE_AND_WAIT_ERROR = """
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR: host-unreachable is "soft" without it
s.connect((sys.argv[1], 9))
s.send(b"x")
try:
    s.recv(1)
    print("answered")
except socket.timeout:
    print("timeout")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def test_guard_route_answers_for_unused_pod_addresses(bed: Testbed) -> None:
    client = bed.pods["client"]
    unused = str(bed.ipv4_network.network_address + 200)
    route = subprocess.run(["ip", "route", "get", unused], capture_output=True, text=True)
    assert route.returncode != 0 and "No route to host" in route.stderr, route
    before = bed.link_stats(client)
    assert client.exec([sys.executable, "-c", _SEND_ONE_AND_WAIT_ERROR, unused]).stdout.strip() == "EHOSTUNREACH"
    # One datagram in, one ICMP host-unreachable (quoting it) back out: the host answered it,
    # the default route never saw it.
    udp_frame = 14 + 20 + 8 + 1
    assert bed.link_stats(client) - before == LinkStats(
        rx_packets=1, rx_bytes=udp_frame, tx_packets=1, tx_bytes=14 + 20 + 8 + udp_frame - 14)


def test_failed_add_pod_leaves_nothing_and_spares_foreign_objects(bed: Testbed) -> None:
    foreign = bed.pods["client"].netns.removesuffix("client") + "taken"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        links_before = {n for n in _host_links() if fnmatch.fnmatch(n, bed.interface_glob)}
        with pytest.raises(subprocess.CalledProcessError, match="netns"):
            bed.add_pod("taken")
        assert foreign in _netns()  # not ours, so not removed
        assert {n for n in _host_links() if fnmatch.fnmatch(n, bed.interface_glob)} == links_before
        assert "taken" not in bed.pods
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)
    pod = bed.add_pod("taken")
    assert pod.host_ifname not in links_before
    assert send_ping(pod, bed.pods["server"].ipv4, 1, interval=0).received == 1


def test_close_removes_everything(bed: Testbed) -> None:
    tb = Testbed()
    pods = [tb.add_pod("x"), tb.add_pod("y", ipv6=True)]
    procs = [tb.start_udp_sink(pods[0], 7000), tb.start_dnsmasq(pods[1], hosts={"a.test": ["198.51.100.1"]}),
             pods[1].popen(["sleep", "300"])]
    tmpdir = tb.tmpdir
    names = {p.netns for p in pods}
    links = {p.host_ifname for p in pods}
    # Two live testbeds in one process must not share names or globs.
    assert tb.prefix != bed.prefix and not (names & {p.netns for p in bed.pods.values()})
    assert {name for name in _host_links() if fnmatch.fnmatch(name, tb.interface_glob)} == links
    v4_guard = [r for r in _guard_routes("-4") if r["metric"] == os.getpid()]
    v6_guard = [r for r in _guard_routes("-6") if r["metric"] == os.getpid()]
    assert len(v4_guard) == 2 and len(v6_guard) == 1  # bed's and tb's /24, tb's /64
    pod_routes = _ip_json("route", "show", "root", str(tb.ipv4_network))
    assert {r["dst"] for r in pod_routes} >= {pods[0].ipv4, pods[1].ipv4}

    tb.close()
    tb.close()  # idempotent

    assert not names & _netns()
    assert not links & _host_links()
    assert all(p.poll() is not None for p in procs)
    assert not os.path.exists(tmpdir)
    assert [r for r in _guard_routes("-4") if r["metric"] == os.getpid()] == [
        r for r in v4_guard if r["dst"] != str(tb.ipv4_network)]
    assert [r for r in _guard_routes("-6") if r["metric"] == os.getpid()] == []
    assert _ip_json("route", "show", "root", str(tb.ipv4_network)) == []
    with pytest.raises(TestbedError):
        tb.add_pod("z")
    # The module's testbed is untouched.
    assert send_ping(bed.pods["client"], bed.pods["server"].ipv4, 1, interval=0).received == 1


_CHILD = r"""
import json, sys
from testbed import Testbed
tb = Testbed()
pod = tb.add_pod("orphan", ipv6=True)
sink = tb.start_udp_sink(pod, 7001)
print(json.dumps({"netns": pod.netns, "link": pod.host_ifname, "v4": str(tb.ipv4_network),
                  "v6": str(tb.ipv6_network), "sink": sink.pid, "tmpdir": tb.tmpdir}), flush=True)
sys.stdin.read()
"""


def test_cleanup_stale_removes_dead_runs_only() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None
        left = json.loads(child.stdout.readline())
        assert left["netns"] in _netns() and left["link"] in _host_links()
    finally:
        child.send_signal(signal.SIGKILL)  # no close(), no atexit: what a killed run leaves
        child.wait()

    with Testbed() as live:
        pod = live.add_pod("alive")
        removed = Testbed.cleanup_stale()

        # Another test run on this machine may have cleaned the orphan up first, so what
        # counts is that it is gone; `removed` is checked for what this call could claim.
        assert all(r.split()[0] in ("netns", "link", "route", "process", "dir") for r in removed)
        assert not any(pod.netns in r or pod.host_ifname in r or str(live.ipv4_network) in r for r in removed)
        assert left["netns"] not in _netns()
        assert left["link"] not in _host_links()
        assert not [r for r in _guard_routes("-4") + _guard_routes("-6") if r["dst"] in (left["v4"], left["v6"])]
        assert _process_gone(left["sink"])
        assert not os.path.exists(left["tmpdir"])

        # The live testbed (this process) keeps everything.
        assert pod.netns in _netns() and pod.host_ifname in _host_links()
        assert any(r["dst"] == str(live.ipv4_network) for r in _guard_routes("-4"))
        assert os.path.isdir(live.tmpdir)
        assert not any(left["netns"] in r for r in Testbed.cleanup_stale())


def test_unprivileged_use_names_the_remedy() -> None:
    code = "from testbed import Testbed\nTestbed()"
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                          sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
    assert res.returncode != 0
    assert "TestbedError" in res.stderr and "needs root" in res.stderr
