"""End to end on the real kernel: pods, known traffic, `flowtel run`, Hubble JSON out.

The truth is the kernel's own `ip -s link` counters of the host-side veths. The testbed is
quiet (static neighbours, no IPv6 on the veths), so those deltas are exactly the test's
frames. Link-layer accounting: tc sees ``skb->len`` with the 14-byte Ethernet header, which
is what veth counts as well, so bytes must agree exactly too (difference stated: 0).
"""
from __future__ import annotations

from tests.support.flowlog import read_flow_log

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from testbed import Testbed, send_ping, send_tcp, send_udp

pytestmark = pytest.mark.kernel

ETH, IP4, UDP = 14, 20, 8


def tc_filters(ifname: str, hook: str) -> list[str]:
    out = subprocess.run(["tc", "filter", "show", "dev", ifname, hook], capture_output=True, text=True).stdout
    # One line per filter instance ("... bpf chain 0 handle 0x... name ..."), not the chain header.
    return [line for line in out.splitlines() if " bpf " in line and " handle " in line]


def filter_ids(ifname: str, hook: str) -> set[str]:
    """Kernel ids of the programs in flowtel's filters on one hook."""
    return {line.split(" id ")[1].split()[0] for line in tc_filters(ifname, hook) if " id " in line}


def has_clsact(ifname: str) -> bool:
    out = subprocess.run(["tc", "qdisc", "show", "dev", ifname], capture_output=True, text=True).stdout
    return "clsact" in out


class Agent:
    """`flowtel run` as a user runs it: a process with a config file, stopped by SIGTERM."""

    def __init__(self, tmp: Path, glob: str, interval: str = "1s") -> None:
        self.flow_log = tmp / "flows.log"
        self.config = tmp / "flowtel.yaml"
        self.config.write_text(
            f"""
receivers:
  ebpf:
    interfaces: ["{glob}"]
    collection_interval: {interval}
exporters:
  file:
    path: {self.flow_log}
    max_size_mb: 100
service:
  pipelines:
    logs:
      receivers: [ebpf]
      exporters: [file]
"""
        )
        self.stderr = tmp / "agent.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowtel.cli", "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr.open("w"),
            env={**os.environ, "NODE_NAME": "test-node"},
        )

    def wait_attached(self, ifnames: list[str], timeout: float = 60, not_ids: set[str] = frozenset()) -> None:
        """Until each interface has flowtel filters on both hooks whose program ids are not in
        ``not_ids`` (those of a killed agent, which stay attached until replaced)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(
                (ids := filter_ids(i, "ingress")) and ids.isdisjoint(not_ids) and filter_ids(i, "egress")
                for i in ifnames
            ):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.stderr.read_text()}")
            time.sleep(0.1)
        raise AssertionError(f"agent did not attach to {ifnames}: {self.stderr.read_text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def flows(self) -> list[dict]:
        """The aggregated L3/L4 flow records (drops and TCP events, also written, are not counts)."""
        out = []
        for env in read_flow_log(self.flow_log):  # every line parsed strictly as Cilium's schema
            assert set(env) >= {"node_name", "time"} and ("flow" in env or "lost_events" in env), env
            flow = env.get("flow")
            ext = flow.get("extensions", {}) if flow else {}
            if flow and flow["verdict"] == "FORWARDED" and "packets" in ext and "tcp_event" not in ext:
                out.append(flow)
        return out


def totals_by_iface(flows: list[dict]) -> dict[tuple[str, str], list[int]]:
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for f in flows:
        t = totals[(f["interface"]["name"], f["traffic_direction"])]
        t[0] += f["extensions"]["packets"]
        t[1] += f["extensions"]["bytes"]
    return totals


def find(flows: list[dict], *, iface: str, src: str, dst: str, proto: str, sport: int | None = None, dport: int | None = None) -> list[dict]:
    out = []
    for f in flows:
        if f["interface"]["name"] != iface or f.get("IP", {}).get("source") != src or f["IP"]["destination"] != dst:
            continue
        l4 = f.get("l4", {}).get(proto)
        if l4 is None:
            continue
        if sport is not None and l4.get("source_port") != sport:
            continue
        if dport is not None and l4.get("destination_port") != dport:
            continue
        out.append(f)
    return out


def test_counts_equal_kernel_link_counters_exactly(bed: Testbed, tmp_path: Path) -> None:
    a, b, c = (bed.add_pod(n) for n in ("pod-a", "pod-b", "pod-c"))
    tcp_sink = bed.start_tcp_sink(b, 8080)
    bed.start_udp_sink(c, 9000)
    pods = [a, b, c]
    before = {p.name: bed.link_stats(p) for p in pods}

    agent = Agent(tmp_path, bed.interface_glob)
    agent.wait_attached([p.host_ifname for p in pods])

    tcp_small = send_tcp(a, b.ipv4, 8080, 100_000)
    tcp_large = send_tcp(a, b.ipv4, 8080, 3_000_000)
    udp = send_udp(a, c.ipv4, 9000, 20, 500, interval=0.005)
    ping = send_ping(b, c.ipv4, 5, interval=0.05)
    assert ping.received == 5
    assert [r["bytes"] for r in tcp_sink.wait_records(2)] == [100_000, 3_000_000]
    time.sleep(1.5)  # more than one collection interval with traffic in flight and drains racing

    assert agent.stop() == 0, agent.stderr.read_text()
    after = {p.name: bed.link_stats(p) for p in pods}
    flows = agent.flows()
    assert flows and all(f["node_name"] == "test-node" and f["Type"] == "L3_L4" for f in flows)

    totals = totals_by_iface(flows)
    for p in pods:
        d = after[p.name] - before[p.name]
        assert d.rx_packets > 0 and d.tx_packets > 0
        # Host-side rx = sent by the pod = EGRESS from the pod's point of view.
        assert totals[(p.host_ifname, "EGRESS")] == [d.rx_packets, d.rx_bytes], p.name
        assert totals[(p.host_ifname, "INGRESS")] == [d.tx_packets, d.tx_bytes], p.name

    # The UDP flow: exactly the datagrams sent, each 14 + 20 + 8 + 500 bytes on the wire.
    udp_flows = find(flows, iface=a.host_ifname, src=a.ipv4, dst=c.ipv4, proto="UDP", sport=udp.src_port, dport=9000)
    assert sum(f["extensions"]["packets"] for f in udp_flows) == 20
    assert sum(f["extensions"]["bytes"] for f in udp_flows) == 20 * (ETH + IP4 + UDP + 500)
    assert all(f["traffic_direction"] == "EGRESS" for f in udp_flows)
    # ... and the same datagrams leaving the host into pod-c.
    udp_in = find(flows, iface=c.host_ifname, src=a.ipv4, dst=c.ipv4, proto="UDP", sport=udp.src_port)
    assert sum(f["extensions"]["packets"] for f in udp_in) == 20
    assert all(f["traffic_direction"] == "INGRESS" for f in udp_in)

    # TCP: one SYN per connection from the client, one SYN-ACK back, flags in the l4 union.
    for sent in (tcp_small, tcp_large):
        out = find(flows, iface=a.host_ifname, src=a.ipv4, dst=b.ipv4, proto="TCP", sport=sent.src_port, dport=8080)
        assert out, f"no flow for {sent}"
        assert sum(f["extensions"]["tcp_flags"]["SYN"] for f in out) == 1
        assert any(f["l4"]["TCP"]["flags"].get("SYN") for f in out)
        back = find(flows, iface=a.host_ifname, src=b.ipv4, dst=a.ipv4, proto="TCP", sport=8080, dport=sent.src_port)
        assert sum(f["extensions"]["tcp_flags"]["SYN-ACK"] for f in back) == 1
        # Request and reply, in every interval of the connection (remembered from its handshake).
        assert all(f["is_reply"] is False for f in out) and all(f["is_reply"] is True for f in back)
    # ICMP echo: 5 requests out of pod-b, 5 replies into it.
    req = find(flows, iface=b.host_ifname, src=b.ipv4, dst=c.ipv4, proto="ICMPv4")
    assert sum(f["extensions"]["packets"] for f in req) == 5
    assert all(f["l4"]["ICMPv4"]["type"] == 8 and f["is_reply"] is False for f in req)
    rep = find(flows, iface=b.host_ifname, src=c.ipv4, dst=b.ipv4, proto="ICMPv4")
    assert sum(f["extensions"]["packets"] for f in rep) == 5 and all(f["is_reply"] is True for f in rep)
    assert all(f["is_reply"] is False for f in udp_flows)  # from an ephemeral port to 9000

    # Clean detach: no flowtel filter and no clsact qdisc left behind.
    for p in pods:
        assert not tc_filters(p.host_ifname, "ingress") and not tc_filters(p.host_ifname, "egress")
        assert not has_clsact(p.host_ifname)


def test_new_interface_attaches_and_killed_agent_filters_are_replaced(bed: Testbed, tmp_path: Path) -> None:
    a = bed.add_pod("early")
    agent = Agent(tmp_path, bed.interface_glob)
    agent.wait_attached([a.host_ifname])

    late = bed.add_pod("late")  # appears while the agent runs: netlink must attach it
    agent.wait_attached([late.host_ifname], timeout=10)
    before = bed.link_stats(late)
    assert send_ping(late, a.ipv4, 3, interval=0.05).received == 3
    time.sleep(0.3)
    assert agent.stop() == 0, agent.stderr.read_text()
    d = bed.link_stats(late) - before
    totals = totals_by_iface(agent.flows())
    assert totals[(late.host_ifname, "EGRESS")] == [d.rx_packets, d.rx_bytes]

    # A killed agent cannot detach; the next one must replace its filters, not stack on them.
    killed = Agent(_subdir(tmp_path, "killed"), bed.interface_glob)
    killed.wait_attached([a.host_ifname, late.host_ifname])
    killed.proc.kill()
    killed.proc.wait()
    assert len(tc_filters(a.host_ifname, "ingress")) == 1
    leftover = filter_ids(a.host_ifname, "ingress") | filter_ids(late.host_ifname, "ingress")
    again = Agent(_subdir(tmp_path, "again"), bed.interface_glob)
    again.wait_attached([a.host_ifname, late.host_ifname], not_ids=leftover)
    time.sleep(0.5)
    assert len([x for x in tc_filters(a.host_ifname, "ingress") if "flowtel" in x]) == 1
    assert again.stop() == 0
    assert not tc_filters(a.host_ifname, "ingress")


def test_removed_interface_is_forgotten_and_counts_survive(bed: Testbed, tmp_path: Path) -> None:
    a, b = bed.add_pod("keep"), bed.add_pod("gone")
    agent = Agent(tmp_path, bed.interface_glob, interval="30s")
    agent.wait_attached([a.host_ifname, b.host_ifname])
    assert send_ping(b, a.ipv4, 4, interval=0.05).received == 4
    gone_ifname = b.host_ifname
    subprocess.run(["ip", "netns", "del", b.netns], check=True)  # the pod goes away: its veth too
    deadline = time.monotonic() + 5
    while subprocess.run(["ip", "link", "show", gone_ifname], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert agent.stop() == 0, agent.stderr.read_text()
    flows = agent.flows()
    # The pings counted before the interface vanished are still reported, and named.
    req = find(flows, iface=gone_ifname, src=b.ipv4, dst=a.ipv4, proto="ICMPv4")
    assert sum(f["extensions"]["packets"] for f in req) == 4
    assert "Traceback" not in agent.stderr.read_text()


def _subdir(tmp: Path, name: str) -> Path:
    p = tmp / name
    p.mkdir()
    return p
