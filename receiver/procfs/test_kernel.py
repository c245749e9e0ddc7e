"""The procfs receiver against the kernel's own tools on this machine: nstat, ip -s -s link,
and sockets the test opens itself (in the host namespace and inside a testbed pod)."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from typing import Any, Iterator

import pytest

from flowtel.component import CreateSettings, Telemetry
from flowtel.records import MetricPoint
from flowtel.testbed import Pod, Testbed, send_ping
from receiver.procfs.config import ProcfsReceiverConfig
from receiver.procfs.receiver import ProcfsReceiver

pytestmark = pytest.mark.kernel

OFF = {"enabled": False}
ALL_OFF = {name: OFF for name in ("tcp_connection_stats", "ip_connection_stats", "udp_connection_stats",
                                  "interface_stats", "tcp_state", "tcp_connection_remote", "udp_active_sockets")}


class _Discard:
    def consume(self, batch: list) -> None:
        pass


def poll(config: dict[str, Any]) -> list[MetricPoint]:
    """One poll, made from a thread other than the main one as the receiver's own polls are:
    /proc/self/net follows the main thread, /proc/thread-self/net the polling thread."""
    cfg = ProcfsReceiverConfig.model_validate(config)
    rec = ProcfsReceiver(CreateSettings("procfs", "n", Telemetry()), cfg, _Discard())
    result: list[list[MetricPoint]] = []
    worker = threading.Thread(target=lambda: result.append(rec.poll_once()))
    worker.start()
    worker.join(30)
    (points,) = result
    assert rec.settings.telemetry.get("procfs", "parse_errors") == 0
    return points


def nstat() -> dict[str, int]:
    # Text, not --json: iproute2 6.1's JSON output truncates counters to 32 bits
    # (IpExtInOctets 41565686143 printed as 2910980479).
    out = subprocess.run(["nstat", "-a", "-s", "-z"], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            name, value, _rate = line.split()
            values[name] = int(value)
    return values


# nstat names a counter section + name for /proc/net/snmp and netstat, and as is for snmp6.
SECTIONS = {
    "networkobservability_tcp_connection_stats": ("TcpExt", "MPTcpExt", "Tcp"),
    "networkobservability_ip_connection_stats": ("IpExt", "Ip", ""),
    "networkobservability_udp_connection_stats": ("Udp", ""),
}


def test_protocol_counters_equal_nstat() -> None:
    everything = {"include_statistics": [".*"]}
    config = {"metrics": {**ALL_OFF, "tcp_connection_stats": everything, "ip_connection_stats": everything,
                          "udp_connection_stats": everything}}
    before = nstat()
    points = poll(config)
    after = nstat()
    compared: set[str] = set()
    for p in points:
        name = p.attributes["statistic_name"]
        keys = [section + name for section in SECTIONS[p.name] if section + name in after]
        assert len(keys) == 1, f"{p.name} {name}: nstat names {keys}"
        key = keys[0]
        assert before[key] <= p.value <= after[key], f"{key}: nstat {before[key]}..{after[key]}, flowtel {p.value}"
        compared.add(key)
    # Every counter nstat shows for these sections is reported (nstat itself leaves out the
    # settings such as IpForwarding and TcpCurrEstab; MPTCP's current count is a level too).
    expected = {
        k for k in after
        if k.startswith(("Tcp", "MPTcpExt", "Ip", "Udp")) and not k.startswith("UdpLite")
        and k != "MPTcpExtMPCurrEstab"
    }
    assert compared == expected
    assert len(compared) > 200


def _ip_link(dev: str, netns: str | None = None) -> dict[str, int]:
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-s", "-s", "-j", "link", "show", "dev", dev]
    st = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)[0]["stats64"]
    rx, tx = st["rx"], st["tx"]
    # /proc/net/dev's columns, which sum some of the fields (see netdev.py).
    return {
        "rx_bytes": rx["bytes"], "rx_packets": rx["packets"], "rx_errors": rx["errors"],
        "rx_dropped": rx["dropped"] + rx["missed_errors"], "rx_fifo_errors": rx["fifo_errors"],
        "rx_frame_errors": rx["length_errors"] + rx["over_errors"] + rx["crc_errors"] + rx["frame_errors"],
        "rx_compressed": rx.get("compressed", 0), "rx_multicast": rx["multicast"],
        "tx_bytes": tx["bytes"], "tx_packets": tx["packets"], "tx_errors": tx["errors"],
        "tx_dropped": tx["dropped"], "tx_fifo_errors": tx["fifo_errors"], "tx_collisions": tx["collisions"],
        "tx_carrier_errors": tx["carrier_errors"] + tx["aborted_errors"] + tx["window_errors"] + tx["heartbeat_errors"],
        "tx_compressed": tx.get("compressed", 0),
    }


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    Testbed.cleanup_stale()
    with Testbed() as tb:
        for name in ("a", "b", "down", "sockets", "states", "visit"):
            tb.add_pod(name)
        yield tb


def _interface_stats(points: list[MetricPoint], netns: str | None = None) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for p in points:
        if p.name == "networkobservability_interface_stats" and p.attributes.get("netns") == netns:
            out.setdefault(p.attributes["interface_name"], {})[p.attributes["statistic_name"]] = p.value
    return out


def test_interface_stats_equal_ip_link_for_veths_including_drops(bed: Testbed) -> None:
    a, b, down = bed.pods["a"], bed.pods["b"], bed.pods["down"]
    assert send_ping(a, b.ipv4, 3, interval=0.0).received == 3
    # A veth whose peer is down drops what it is given to send: real tx_dropped to compare.
    subprocess.run(["ip", "-n", down.netns, "link", "set", "eth0", "down"], check=True)
    dropped_before = _ip_link(down.host_ifname)["tx_dropped"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(7):
            s.sendto(b"x" * 32, (down.ipv4, 9))
    assert _ip_link(down.host_ifname)["tx_dropped"] - dropped_before == 7

    points = poll({
        "metrics": {**ALL_OFF, "interface_stats": {"include_statistics": [".*"]}},
        "interfaces": [bed.interface_glob, "eth0"],  # the glob for the host, eth0 in the pod
        "netns": [a.netns],
    })
    host = _interface_stats(points)
    veths = {p.host_ifname for p in bed.pods.values()}
    assert veths <= set(host) and not {name for name in set(host) - veths if name != "eth0"}
    for pod in bed.pods.values():
        assert host[pod.host_ifname] == _ip_link(pod.host_ifname), pod.name
    assert host[down.host_ifname]["tx_dropped"] >= 7
    assert host[a.host_ifname]["rx_packets"] >= 3 and host[b.host_ifname]["tx_packets"] >= 3

    # Inside pod a's namespace: its eth0 (lo is excluded by default), the same numbers as `ip -n`.
    inside = _interface_stats(points, netns=a.netns)
    assert set(inside) == {"eth0"}
    assert inside["eth0"] == _ip_link("eth0", netns=a.netns)
    assert inside["eth0"]["tx_packets"] == host[a.host_ifname]["rx_packets"]


def _states(points: list[MetricPoint], netns: str | None = None) -> dict[str, float]:
    return {p.attributes["state"]: p.value for p in points
            if p.name == "networkobservability_tcp_state" and p.attributes.get("netns") == netns}


@contextlib.contextmanager
def loopback_connections(n: int) -> Iterator[None]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(n)
        port = listener.getsockname()[1]
        with contextlib.ExitStack() as stack:
            for _ in range(n):
                stack.enter_context(socket.create_connection(("127.0.0.1", port)))
                stack.enter_context(listener.accept()[0])
            yield


def test_tcp_state_counts_loopback_connections_in_the_host_namespace() -> None:
    n = 40
    config = {"metrics": {**ALL_OFF, "tcp_state": {}}}
    before = _states(poll(config))
    with loopback_connections(n):
        during = _states(poll(config))
    # Both ends of a loopback connection are sockets of this namespace; other processes may
    # open more meanwhile, hence at least.
    assert during["ESTABLISHED"] - before["ESTABLISHED"] >= 2 * n
    assert during["LISTEN"] >= 1


_HOLD_SOCKETS = r"""
import socket, sys
n, m = int(sys.argv[1]), int(sys.argv[2])
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(n)
keep = [l]
for _ in range(n):
    keep.append(socket.create_connection(l.getsockname())); keep.append(l.accept()[0])
for _ in range(m):
    u = socket.socket(socket.AF_INET6 if len(keep) % 2 else socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("::1" if u.family == socket.AF_INET6 else "127.0.0.1", 0)); keep.append(u)
print("ready", flush=True)
sys.stdin.read()
"""


def _pod_process(pod: Pod, n: int, m: int) -> subprocess.Popen[str]:
    proc = pod.popen([sys.executable, "-c", _HOLD_SOCKETS, str(n), str(m)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_socket_gauges_of_a_pod_namespace_are_exact(bed: Testbed) -> None:
    pod = bed.pods["sockets"]
    subprocess.run(["ip", "-n", pod.netns, "link", "set", "lo", "up"], check=True)
    proc = _pod_process(pod, n=5, m=3)
    gauges = {**ALL_OFF, "tcp_state": {}, "tcp_connection_remote": {}, "udp_active_sockets": {}}
    try:
        by_pid = f"/proc/{proc.pid}/ns/net"
        points = poll({"metrics": gauges, "netns": [pod.netns, by_pid]})  # tcp_state by sock_diag
        from_files = poll({"metrics": gauges, "proc_path": f"/proc/{proc.pid}"})  # /proc/<pid>/net/tcp{,6}
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    for netns in (pod.netns, by_pid):
        states = _states(points, netns)
        assert states["ESTABLISHED"] == 10 and states["LISTEN"] == 1
        assert sum(states.values()) == 11, states
        udp = [p.value for p in points if p.name == "networkobservability_udp_active_sockets"
               and p.attributes.get("netns") == netns]
        assert udp == [3]
        # Retina's AllIPs series: the 11 sockets the pod's process holds, whatever the address.
        remote = [(p.attributes["address"], p.value) for p in points
                  if p.name == "networkobservability_tcp_connection_remote" and p.attributes.get("netns") == netns]
        assert remote == [("AllIPs", 11)]
    assert _states(from_files) == _states(points, pod.netns)
    # The node's own namespace is reported beside them, without a netns label.
    assert set(_states(points)) == set(_states(points, pod.netns))


# -- tcp_state from pyroute2's DiagSocket, state by state --------------------------------------

_STATE_SOCKETS = r"""
import socket, sys, time
n = int(sys.argv[1])
keep = []
for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    l = socket.socket(fam); l.bind((addr, 0)); l.listen(64); keep.append(l)            # LISTEN
    port = l.getsockname()[1]
    for _ in range(n):                                                                     # 2n ESTABLISHED
        keep.append(socket.create_connection((addr, port))); keep.append(l.accept()[0])
    c = socket.create_connection((addr, port)); s = l.accept()[0]
    c.shutdown(socket.SHUT_WR); keep += [c, s]                         # FIN_WAIT2, CLOSE_WAIT
    c = socket.create_connection((addr, port)); s = l.accept()[0]
    c.close(); time.sleep(0.05); s.close()                            # TIME_WAIT (c's, orphaned)
    if fam == socket.AF_INET:  # the pod's devices other than lo have IPv6 disabled
        c = socket.socket(fam); c.setblocking(False); c.connect_ex(("10.99.0.2", 9)); keep.append(c)  # SYN_SENT
    b = socket.socket(fam); b.bind((addr, 0)); keep.append(b)     # bound only: CLOSE, netlink only
time.sleep(0.2)
print("ready", flush=True)
sys.stdin.read()
"""
# Per address family; CLOSE is the bound-only socket, which /proc/net/tcp does not list.
_OPENED = {"LISTEN": 1, "FIN_WAIT2": 1, "CLOSE_WAIT": 1, "TIME_WAIT": 1, "CLOSE": 1}


def test_tcp_state_by_netlink_counts_every_state_opened_in_a_pod_and_agrees_with_proc(bed: Testbed) -> None:
    pod = bed.pods["states"]
    # SYN_SENT: a connection to a neighbour that never answers (the veth peer has no address).
    for cmd in (["link", "set", "lo", "up"], ["link", "add", "away", "type", "veth", "peer", "name", "silent"],
                ["link", "set", "away", "up"], ["link", "set", "silent", "up"],
                ["addr", "add", "10.99.0.1/24", "dev", "away"]):
        subprocess.run(["ip", "-n", pod.netns, *cmd], check=True)
    n = 7
    proc = pod.popen([sys.executable, "-c", _STATE_SOCKETS, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    gauges = {**ALL_OFF, "tcp_state": {}}
    try:
        by_netlink = _states(poll({"metrics": {**gauges, "tcp_state": {"source": "netlink"}}, "netns": [pod.netns]}), pod.netns)
        from_files = _states(poll({"metrics": gauges, "proc_path": f"/proc/{proc.pid}"}))
        ss = subprocess.run(["ip", "netns", "exec", pod.netns, "ss", "-tan", "-H"],
                            check=True, capture_output=True, text=True).stdout
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    expected = {state: 0 for state in by_netlink}
    expected.update({state: 2 * count for state, count in _OPENED.items()})  # IPv4 and IPv6
    expected["ESTABLISHED"] = 2 * 2 * n
    expected["SYN_SENT"] = 1
    assert by_netlink == expected, ss
    assert len(by_netlink) == 11
    assert from_files == {**by_netlink, "CLOSE": 0}


def test_sock_diag_counts_the_namespace_entered_and_leaves_nothing_open(bed: Testbed) -> None:
    """The DiagSocket is made inside the namespace the thread entered, and closed there."""
    import os
    from collections import Counter

    from receiver.procfs import sockdiag
    from receiver.procfs.netns import in_netns

    pod = bed.pods["visit"]
    subprocess.run(["ip", "-n", pod.netns, "link", "set", "lo", "up"], check=True)
    proc = _pod_process(pod, n=4, m=0)
    result: list[tuple[Counter[int], int]] = []
    fds: list[int] = []

    def visit() -> None:
        before = len(os.listdir("/proc/thread-self/fd"))
        for _ in range(20):
            result.append(in_netns(f"/proc/{proc.pid}/ns/net", sockdiag.tcp_states))
        fds.extend((before, len(os.listdir("/proc/thread-self/fd"))))

    try:
        worker = threading.Thread(target=visit)
        worker.start()
        worker.join(30)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    assert len(result) == 20
    assert all(r == (Counter({1: 8, 10: 1}), 0) for r in result), result[0]
    assert fds[0] == fds[1]  # nothing left open by pyroute2 (socket, event loop)


def test_sock_diag_error_reply_raises_and_the_receiver_reads_proc_instead(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A request the kernel refuses ends with NLMSG_DONE carrying -ENOENT (no inet_diag handler
    for protocol 255 on any kernel), which must not read as a namespace without sockets."""
    import errno
    import logging

    from receiver.procfs import sockdiag

    monkeypatch.setattr(sockdiag, "PROTOCOL", 255)
    with pytest.raises(OSError) as info:
        sockdiag.tcp_states()
    assert info.value.errno == errno.ENOENT
    with loopback_connections(3):
        states = _states(poll({"metrics": {**ALL_OFF, "tcp_state": {"source": "netlink"}}}))
    assert states["ESTABLISHED"] >= 6 and states["LISTEN"] >= 1
    assert any("/proc/net/tcp" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_sock_diag_counts_replies_it_cannot_read_and_keeps_what_it_could(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real dumps, each cut after its first record by a message of no sock_diag type and a
    record pyroute2 cannot decode (which ends its dump): counted, never raised."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink import nlmsg
    from pyroute2.netlink.exceptions import NetlinkDataDecodeError, NetlinkError

    from receiver.procfs import sockdiag

    real = DiagSocket.nlm_request

    def cut(self, *argv, **kwarg):  # type: ignore[no-untyped-def]
        for msg in real(self, *argv, **kwarg):
            yield msg
            break
        odd = nlmsg()
        odd["header"]["type"] = 99
        yield odd
        raise NetlinkDataDecodeError(ValueError("short inet_diag_msg"))

    # Enough sockets that the IPv4 dump spans several messages: the cut one is still running
    # in the kernel when the IPv6 dump is asked for (on a socket of its own, so not EBUSY).
    with loopback_connections(300):
        full, _ = sockdiag.tcp_states()
        monkeypatch.setattr(DiagSocket, "nlm_request", cut)
        states, errors = sockdiag.tcp_states()
    assert errors == 2 * len(sockdiag.FAMILIES)
    # The first record of each family's dump was counted (IPv6 may have none on this node).
    assert 1 <= sum(states.values()) <= 2 and not states - full

    def refuse(self, *argv, **kwarg):  # type: ignore[no-untyped-def]
        raise NetlinkError(13)
        yield

    monkeypatch.setattr(DiagSocket, "nlm_request", refuse)
    with pytest.raises(OSError) as info:
        sockdiag.tcp_states()
    assert info.value.errno == 13
