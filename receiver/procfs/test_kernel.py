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
                                  "interface_stats", "tcp_state", "udp_active_sockets")}


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
        for name in ("a", "b", "down", "sockets"):
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
    gauges = {**ALL_OFF, "tcp_state": {}, "udp_active_sockets": {}}
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
    assert _states(from_files) == _states(points, pod.netns)
    # The node's own namespace is reported beside them, without a netns label.
    assert set(_states(points)) == set(_states(points, pod.netns))
