"""POLICY_DENIED drops through the agent's pipeline, and the DNS proxy's own /metrics.

`flowtel dnsproxy` runs as its own process over the testbed pods of test_fqdn_policy_e2e
(imported, not copied); the agent runs in-process: the fqdnpolicy receiver reads the proxy's
pinned counters, k8sattributes names the pods from the same pods file the proxy reads, the
hubblemetrics connector counts hubble_drop_total, a file exporter writes the flow log and a
Prometheus exporter serves what a real scrape reads.

Truth: the client pod's host-side veth counters (`ip -s link`: the testbed is quiet, so their
delta is exactly the test's frames), a packet capture for TCP SYNs, a UDP sink in the peer pod
(audit mode delivers), and the queries the test itself sends to the proxy.
"""
from __future__ import annotations

from tests.support.flowlog import read_flow_log

import os
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from dnsproxy.datapath import MODE_ENFORCE, Datapath, uninstall
from flowtel.component import Status
from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.registry import factories_by_kind
from testbed import capture, send_udp
from tests.integration.test_fqdn_policy_e2e import Bed, Proxy, bed, connect, dig  # noqa: F401 - bed is a fixture
from tests.support.otlp_receiver import free_port

pytestmark = pytest.mark.kernel

DENIED_PORT = 9999
DATAGRAMS = 25

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus text page as {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = tuple(sorted((k, v.replace('\\"', '"').replace("\\\\", "\\"))
                              for k, v in _LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def series(page: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The series of ``name`` whose labels include ``labels``."""
    return {lab: v for (n, lab), v in page.items() if n == name and set(labels.items()) <= set(lab)}


class Agent:
    """The agent's pipeline in this process: fqdnpolicy → k8sattributes → file + hubblemetrics → prometheus."""

    def __init__(self, bed: Bed, pin_dir: str, tmp: Path) -> None:
        self.flow_log = tmp / "agent-flows.log"
        factories = factories_by_kind()
        cfg = parse_config({
            "receivers": {"fqdnpolicy": {"pin_dir": pin_dir, "collection_interval": "300ms"}},
            "processors": {"k8sattributes": {"source": "static", "static": {"path": str(bed.pods_file)}}},
            "connectors": {"hubblemetrics": {"interval": "300ms", "metrics": [
                "drop:sourceContext=pod;destinationContext=pod", "flow:sourceContext=pod", "lost-events"]}},
            "exporters": {"file": {"path": str(self.flow_log)}, "prometheus": {"endpoint": "127.0.0.1:0"}},
            "service": {"pipelines": {
                "logs": {"receivers": ["fqdnpolicy"], "processors": ["k8sattributes"],
                         "exporters": ["file", "hubblemetrics"]},
                "metrics": {"receivers": ["hubblemetrics"], "exporters": ["prometheus"]},
            }},
        }, "test_fqdn_drops_e2e", factories=factories, environ={})
        self.service = Service(cfg, node_name="test-node", factories=factories)
        self.service.start()
        host, port = self.service.exporters["prometheus"].address  # type: ignore[attr-defined]
        self.url = f"http://{host}:{port}/metrics"

    @property
    def receiver(self) -> Any:
        return self.service.receivers["fqdnpolicy"]

    def flows(self) -> list[dict[str, Any]]:
        if not self.flow_log.exists():
            return []
        return [env["flow"] for env in read_flow_log(self.flow_log) if "flow" in env]

    def policy_flows(self, src: str, dst: str) -> list[dict[str, Any]]:
        return [f for f in self.flows() if f.get("IP", {}).get("source") == src
                and f.get("IP", {}).get("destination") == dst]

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def attached(self) -> bool:
        snap = self.service.telemetry.snapshot()
        return snap.get(("fqdnpolicy", "maps_attached")) == 1

    def stop(self) -> None:
        self.service.shutdown()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


def metrics_args() -> tuple[str, str]:
    return ("--metrics-listen", f"127.0.0.1:{free_port()}")


def drop_total(agent: Agent, protocol: str) -> float:
    got = series(scrape(agent.url), "hubble_drop_total", reason="POLICY_DENIED", protocol=protocol,
                 source="default/client", destination="default/other")
    return sum(got.values())


def test_denied_packets_are_policy_denied_drop_flows_and_metrics(bed: Bed, tmp_path: Path,
                                                                 agents: list[Agent]) -> None:
    client, other = bed.client, bed.other
    # The agent first: no proxy on the node yet, so the receiver waits and the agent is healthy.
    pin_dir = f"/sys/fs/bpf/flowtel/dnsproxy-test-t{os.getpid()}"  # the one Proxy will use
    shutil.rmtree(pin_dir, ignore_errors=True)  # a killed run with this pid: the proxy is not there yet
    agent = Agent(bed, pin_dir, tmp_path)
    agents.append(agent)
    assert not agent.attached()
    statuses = agent.service.telemetry.statuses()
    assert all(ev.status is Status.OK for (kind, cid), ev in statuses.items() if cid == "fqdnpolicy"), statuses

    proxy = Proxy(bed, tmp_path, upstream=bed.dns.ipv4, extra=metrics_args())
    try:
        assert proxy.pin_dir == pin_dir
        metrics_url = f"http://{proxy.argv[proxy.argv.index('--metrics-listen') + 1]}/metrics"
        agent.wait("the receiver to find the new pins", agent.attached)

        # Decisions the test causes: one allowed query (UDP), one refused over UDP, one over TCP.
        assert dig(client, bed.dns.ipv4, "allowed.example.test") == ("NOERROR", [bed.web.ipv4])
        assert dig(client, bed.dns.ipv4, "denied.example.test")[0] == "REFUSED"
        assert dig(client, bed.dns.ipv4, "denied.example.test", tcp=True)[0] == "REFUSED"
        page = scrape(metrics_url)
        queries = {dict(lab)["verdict"] + "/" + dict(lab)["protocol"]: v
                   for lab, v in series(page, "flowtel_dnsproxy_queries_total").items()}
        assert queries == {"allowed/udp": 1, "allowed/tcp": 0, "refused/udp": 1, "refused/tcp": 1,
                           "audit/udp": 0, "audit/tcp": 0, "resolver_denied/udp": 0, "resolver_denied/tcp": 0}
        assert page[("flowtel_dnsproxy_policies", (("state", "rejected"),))] == 1
        assert page[("flowtel_dnsproxy_policies", (("state", "accepted"),))] == 1
        assert page[("flowtel_dnsproxy_added_latency_seconds_count", ())] == 1
        assert page[("flowtel_dnsproxy_upstream_latency_seconds_count", ())] == 1
        assert sum(series(page, "flowtel_dnsproxy_upstream_errors_total").values()) == 0
        assert page[("flowtel_dnsproxy_learned_ips_total", ())] == 1

        # N datagrams to an address the client never resolved: every one denied.
        before = bed.tb.link_stats(client)
        send_udp(client, other.ipv4, DENIED_PORT, DATAGRAMS, 32)
        sent = bed.tb.link_stats(client) - before
        assert sent.rx_packets == DATAGRAMS, sent  # the quiet testbed: only the test's frames
        # And TCP: SYNs counted on the wire (connect gives up before a retransmission).
        with capture(client, filter_expr=f"tcp and dst host {other.ipv4}") as lines:
            assert not connect(client, other.ipv4)
            assert not connect(client, other.ipv4)
        syns = sum(1 for line in lines if "Flags [S]," in line)
        assert syns >= 2, lines

        agent.wait("hubble_drop_total for every denied packet",
                   lambda: drop_total(agent, "UDP") == DATAGRAMS and drop_total(agent, "TCP") == syns)
        udp = [f for f in agent.policy_flows(client.ipv4, other.ipv4) if "UDP" in f["l4"]]
        assert sum(f["extensions"]["packets"] for f in udp) == DATAGRAMS
        assert sum(f["extensions"]["bytes"] for f in udp) == sent.rx_bytes
        for f in udp:
            assert f["verdict"] == "DROPPED" and f["drop_reason_desc"] == "POLICY_DENIED"
            assert f["traffic_direction"] == "EGRESS" and f["is_reply"] is False
            assert f["source"]["pod_name"] == "client" and f["source"]["namespace"] == "default"
            assert f["destination"]["pod_name"] == "other"
            assert f["interface"] == {"index": client.host_ifindex, "name": client.host_ifname}
            assert f["l4"]["UDP"]["destination_port"] == DENIED_PORT
        page = scrape(metrics_url)
        assert page[("flowtel_dnsproxy_datapath_packets_total", (("decision", "dropped"),))] == DATAGRAMS + syns

        # The proxy's flow log says the same, aggregated per read.
        deadline = time.monotonic() + 10
        while True:
            logged = sum(f.get("extensions", {}).get("packets", 0) for f in proxy.flows()
                         if f["verdict"] == "DROPPED" and f.get("IP", {}).get("destination") == other.ipv4
                         and "UDP" in f.get("l4", {}))
            if logged == DATAGRAMS:
                break
            assert time.monotonic() < deadline, f"the proxy's flow log has {logged} denied datagrams"
            time.sleep(0.2)

        # The proxy uninstalled and installed again: new maps under the same pins. The receiver
        # lets go of the old ones and counts the new ones from their first packet.
        proxy.close()
        agent.wait("the receiver to let go of removed pins", lambda: not agent.attached())
        proxy = Proxy(bed, tmp_path, upstream=bed.dns.ipv4, extra=metrics_args())
        agent.wait("the receiver to find the replaced pins", agent.attached)
        send_udp(client, other.ipv4, DENIED_PORT, 5, 32)
        agent.wait("the drops on the new maps", lambda: drop_total(agent, "UDP") == DATAGRAMS + 5)
        lost = series(scrape(agent.url), "hubble_lost_events_total")
        assert sum(lost.values()) == 0, lost
    finally:
        proxy.close()


def test_audit_mode_reports_audit_flows_and_no_drops(bed: Bed, tmp_path: Path, agents: list[Agent]) -> None:
    client, other = bed.client, bed.other
    sink = bed.tb.start_udp_sink(other, DENIED_PORT + 1)
    proxy = Proxy(bed, tmp_path, upstream=bed.dns.ipv4, audit=True, extra=metrics_args())
    try:
        # Denied before the agent runs: the pinned counts it finds are its baseline, not news.
        send_udp(client, other.ipv4, DENIED_PORT + 1, 7, 32)
        agent = Agent(bed, proxy.pin_dir, tmp_path)
        agents.append(agent)
        assert agent.attached()
        send_udp(client, other.ipv4, DENIED_PORT + 1, DATAGRAMS, 32)
        assert len(sink.wait_records(7 + DATAGRAMS)) == 7 + DATAGRAMS  # audit: every datagram delivered

        def audited() -> int:
            return sum(f["extensions"]["packets"] for f in agent.policy_flows(client.ipv4, other.ipv4)
                       if f["verdict"] == "AUDIT")

        agent.wait("AUDIT flows for the datagrams sent while the agent ran", lambda: audited() >= DATAGRAMS)
        fds = len(os.listdir("/proc/self/fd"))
        time.sleep(0.7)  # two more collection intervals: nothing else may arrive
        assert audited() == DATAGRAMS
        assert len(os.listdir("/proc/self/fd")) == fds  # re-opening the pins each interval leaks nothing
        flows = agent.policy_flows(client.ipv4, other.ipv4)
        assert {f["verdict"] for f in flows} == {"AUDIT"}
        assert all(f["source"]["pod_name"] == "client" and f["destination"]["pod_name"] == "other" for f in flows)
        page = scrape(agent.url)
        assert series(page, "hubble_drop_total") == {}
        audit_flows = series(page, "hubble_flows_processed_total", verdict="AUDIT", source="default/client")
        assert sum(audit_flows.values()) == DATAGRAMS
        metrics_url = f"http://{proxy.argv[proxy.argv.index('--metrics-listen') + 1]}/metrics"
        proxy_page = scrape(metrics_url)
        assert proxy_page[("flowtel_dnsproxy_datapath_packets_total", (("decision", "audit"),))] == 7 + DATAGRAMS
        assert proxy_page[("flowtel_dnsproxy_datapath_packets_total", (("decision", "dropped"),))] == 0
    finally:
        proxy.close()


_SPRAY = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(int(sys.argv[2]), int(sys.argv[2]) + int(sys.argv[3])):
    s.sendto(b"x" * 16, (sys.argv[1], port))
"""


def test_entries_evicted_from_a_full_map_are_lost_events(bed: Bed, tmp_path: Path, agents: list[Agent]) -> None:
    """A datapath with a tiny fqdn_denied map, denied datagrams to many ports (one entry each):
    every datagram is either a counted drop or inside an evicted entry reported as lost."""
    client, other = bed.client, bed.other
    tag = f"t{os.getpid()}e"
    pin_dir = f"/sys/fs/bpf/flowtel/dnsproxy-test-{tag}"
    label = f"lo:ft{tag}"[:15]
    uninstall(pin_dir, nft_table=f"ftdnsproxy_{tag}", address_label=label)
    datapath = Datapath(pin_dir, nft_table=f"ftdnsproxy_{tag}", address_label=label, max_denied=64)
    try:
        datapath.sync_endpoints({client.ipv4: MODE_ENFORCE})  # default deny, nothing learned
        datapath.sync_attachments({client.host_ifindex})
        agent = Agent(bed, pin_dir, tmp_path)
        agents.append(agent)
        assert agent.attached()
        ports = 400
        before = bed.tb.link_stats(client)
        client.exec([sys.executable, "-c", _SPRAY, other.ipv4, "20000", str(ports)])
        assert (bed.tb.link_stats(client) - before).rx_packets == ports
        assert datapath.counters()["dropped"] == ports
        assert datapath.denied_created() == ports  # one entry per port

        def accounted() -> tuple[float, float]:
            page = scrape(agent.url)
            drops = sum(series(page, "hubble_drop_total", reason="POLICY_DENIED", protocol="UDP").values())
            lost = sum(series(page, "flowtel_lost_events_total", source="FQDN_DENIED_MAP_FULL").values())
            return drops, lost

        agent.wait("every datagram counted as a drop or lost", lambda: sum(accounted()) == ports)
        drops, lost = accounted()
        assert 0 < drops <= 64 and lost >= ports - 64, (drops, lost)
    finally:
        datapath.sync_attachments(set())
        datapath.close()
        uninstall(pin_dir, nft_table=f"ftdnsproxy_{tag}", address_label=label)
