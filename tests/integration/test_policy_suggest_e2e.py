"""`flowtel policy suggest` end to end: observe a workload with the agent, write its policy,
enforce exactly that policy with `flowtel dnsproxy`, and check the workload still works
while everything it never did is refused or dropped.

Pods: "client" (Deployment client, the workload), "dns" (dnsmasq, kube-system/coredns),
"web" (an in-cluster pod), "ext1"/"ext2" (external servers reached by name), "raw" (an
external server reached by address only), "other" (an external server the client never
used), "free" (another workload of the namespace). The agent runs with the flows extension
and k8sattributes from a static file; ext*, raw and other are not in it (reserved:world).

Truth: the policy's rules against the traffic the test made (and did not make), the DNS
proxy's parser taking the output unchanged, then dig answers and TCP connections under the
proxy, its POLICY_DENIED flow and the pinned drop counter.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from dnsproxy.datapath import Datapath
from flowtel.lib.policy import parse_policy
from flowtel.testbed import Testbed, send_tcp
from tests.integration.test_fqdn_policy_e2e import REPO, WEB_PORT, Proxy, connect, dig

pytestmark = pytest.mark.kernel

PEER_PORT = 9090  # a port the client serves: the web pod connects to it (traffic the client did not start)
SIDE_PORT = 9091  # a port web also serves, which the client never uses

_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.8).close()
    print("ok")
except OSError as exc:
    print(exc)
"""


def connect_port(pod: Any, ip: str, port: int) -> bool:
    """A TCP handshake within 0.8 s (below the first SYN retransmission)."""
    return pod.exec([sys.executable, "-c", _CONNECT, ip, str(port)], timeout=30).stdout.strip() == "ok"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _attached(ifname: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", ifname, "ingress"], capture_output=True, text=True).stdout
    return "flowtel_" in out


class Agent:
    """`flowtel run` with the ebpf receiver, static k8sattributes, a file exporter and the flows API."""

    def __init__(self, tb: Testbed, tmp: Path, metadata: Path) -> None:
        self.server = f"127.0.0.1:{_free_port()}"
        self.flow_log = tmp / "agent-flows.log"
        self.stderr = tmp / "agent.stderr"
        config = tmp / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "receivers": {"ebpf": {"interfaces": [tb.interface_glob], "collection_interval": "500ms",
                                   # Node-wide kernel events are other tests' traffic, not the client's.
                                   "kernel_events": {"drops": {"enabled": False}, "tcp": {"enabled": False}}}},
            "processors": {"k8sattributes": {"source": "static", "static": {"path": str(metadata)}}},
            "exporters": {"file": {"path": str(self.flow_log)}},
            "extensions": {"flows": {"endpoint": self.server}},
            "service": {"extensions": ["flows"],
                        "pipelines": {"logs": {"receivers": ["ebpf"], "processors": ["k8sattributes"],
                                               "exporters": ["file"]}}},
        }))
        self.proc = subprocess.Popen([sys.executable, "-m", "flowtel.cli", "run", "--config", str(config)],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.stderr.open("w"),
                                     env={**os.environ, "NODE_NAME": "test-node"})

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc.poll() is None, f"agent exited: {self.stderr.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.stderr.read_text()[-3000:]}"
            time.sleep(0.1)

    def flows(self) -> list[dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://{self.server}/flows?namespace=default", timeout=5) as resp:
                return [json.loads(line)["flow"] for line in resp.read().decode().splitlines() if '"flow"' in line]
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bed:
    """The pods, their servers, and the files both the agent and the proxy read."""

    def __init__(self, tb: Testbed, tmp: Path) -> None:
        self.tb = tb
        self.dns, self.client, self.web, self.free = (tb.add_pod(n) for n in ("dns", "client", "web", "free"))
        self.ext1, self.ext2, self.raw, self.other = (tb.add_pod(n) for n in ("ext1", "ext2", "raw", "other"))
        tb.start_dnsmasq(self.dns, hosts={"api.one.test": [self.ext1.ipv4], "cdn.two.test": [self.ext2.ipv4],
                                          "never.used.test": [self.other.ipv4]})
        for pod in (self.web, self.ext1, self.ext2, self.raw, self.other):
            tb.start_tcp_sink(pod, WEB_PORT)
        tb.start_tcp_sink(self.web, SIDE_PORT)
        tb.start_tcp_sink(self.client, PEER_PORT)
        # k8sattributes' static shape, which the proxy's --pods file also reads (name,
        # namespace, ips, labels; it ignores workloads).
        self.pods_file = tmp / "pods.yaml"
        self.pods_file.write_text(yaml.safe_dump({"pods": [
            {"name": "client-6d4b9c-x2k8p", "namespace": "default", "ips": [self.client.ipv4],
             "labels": {"app": "client", "pod-template-hash": "6d4b9c"},
             "workloads": [{"kind": "Deployment", "name": "client"}, {"kind": "ReplicaSet", "name": "client-6d4b9c"}]},
            {"name": "coredns-5d78c9-q7w2e", "namespace": "kube-system", "ips": [self.dns.ipv4],
             "labels": {"k8s-app": "kube-dns", "pod-template-hash": "5d78c9"},
             "workloads": [{"kind": "Deployment", "name": "coredns"}]},
            {"name": "web-0", "namespace": "default", "ips": [self.web.ipv4], "labels": {"app": "web"},
             "workloads": [{"kind": "StatefulSet", "name": "web"}]},
            {"name": "free-7f8d9-abcde", "namespace": "default", "ips": [self.free.ipv4], "labels": {"app": "free"},
             "workloads": [{"kind": "Deployment", "name": "free"}]},
        ]}))
        self.policies = tmp / "policies"
        self.policies.mkdir()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    Testbed.cleanup_stale()
    with Testbed() as tb:
        yield Bed(tb, tmp_path_factory.mktemp("suggest"))


def _egress_to(flows: list[dict[str, Any]], src: str, dst: str) -> bool:
    return any(f.get("IP", {}).get("source") == src and f.get("IP", {}).get("destination") == dst
               and f.get("traffic_direction") == "EGRESS" and "l7" not in f for f in flows)


def _answered(flows: list[dict[str, Any]], name: str) -> bool:
    return any(f.get("l7", {}).get("type") == "RESPONSE" and f["l7"].get("dns", {}).get("query") == name + "."
               for f in flows)


def suggest_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowtel.cli", "policy", "suggest", *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_suggested_policy_allows_what_the_workload_did_and_nothing_else(bed: Bed, tmp_path: Path) -> None:
    # 1. Observe: the client resolves two names and connects to them, to a pod, to an address.
    agent = Agent(bed.tb, tmp_path, bed.pods_file)
    try:
        agent.wait(lambda: all(_attached(p.host_ifname) for p in (bed.client, bed.dns, bed.web, bed.free)),
                   "tc attach")
        assert dig(bed.client, bed.dns.ipv4, "api.one.test") == ("NOERROR", [bed.ext1.ipv4])
        assert dig(bed.client, bed.dns.ipv4, "cdn.two.test") == ("NOERROR", [bed.ext2.ipv4])
        for ip in (bed.ext1.ipv4, bed.ext2.ipv4, bed.web.ipv4, bed.raw.ipv4):
            assert connect(bed.client, ip)
        # Not the client's own egress: a connection the web pod opens to it (the client only
        # replies), and another workload resolving and reaching what the client never does.
        send_tcp(bed.web, bed.client.ipv4, PEER_PORT, 2000)
        assert dig(bed.free, bed.dns.ipv4, "never.used.test") == ("NOERROR", [bed.other.ipv4])
        assert connect(bed.free, bed.other.ipv4)  # reachable: later drops are the policy's doing
        assert connect_port(bed.free, bed.web.ipv4, SIDE_PORT)

        def complete() -> bool:
            flows = agent.flows()
            return (all(_egress_to(flows, bed.client.ipv4, ip)
                        for ip in (bed.ext1.ipv4, bed.ext2.ipv4, bed.web.ipv4, bed.raw.ipv4))
                    and _egress_to(flows, bed.free.ipv4, bed.other.ipv4)
                    and _answered(flows, "api.one.test") and _answered(flows, "cdn.two.test"))

        agent.wait(complete, "the client's traffic in the agent's flow ring", timeout=20)
        time.sleep(1.2)  # two more drains: the connections' last segments settle

        # 2. Suggest, from the running agent.
        res = suggest_cli("--server", agent.server, "--namespace", "default", "--workload", "client")
        assert res.returncode == 0, res.stderr
        from_agent = res.stdout
    finally:
        agent.stop()

    policy = yaml.safe_load(from_agent)
    parse_policy(policy, "suggested")  # the proxy's parser takes it unchanged
    assert (policy["apiVersion"], policy["kind"]) == ("cilium.io/v2", "CiliumNetworkPolicy")
    assert (policy["metadata"]["name"], policy["metadata"]["namespace"]) == ("client", "default")
    # The workload's stable labels: no pod-template-hash, no Cilium-only labels.
    assert policy["spec"]["endpointSelector"] == {"matchLabels": {"app": "client"}}
    tcp = [{"ports": [{"port": str(WEB_PORT), "protocol": "TCP"}]}]
    assert policy["spec"]["egress"] == [
        {"toEndpoints": [{"matchLabels": {"io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}],
         "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}],
                      "rules": {"dns": [{"matchName": "api.one.test"}, {"matchName": "cdn.two.test"}]}}]},
        {"toFQDNs": [{"matchName": "api.one.test"}, {"matchName": "cdn.two.test"}], "toPorts": tcp},
        {"toEndpoints": [{"matchLabels": {"app": "web", "io.kubernetes.pod.namespace": "default"}}], "toPorts": tcp},
        {"toCIDR": [f"{bed.raw.ipv4}/32"], "toPorts": tcp},
    ], from_agent
    # Provenance: each entry's comment counts the flows it came from (a connection can span drains).
    assert re.search(r"# api\.one\.test: TCP/8080: \d+ flows?, \d+ packets, \d+ bytes, first ", from_agent), from_agent
    assert f"# default/web-0: TCP/{WEB_PORT}: " in from_agent

    # The same from the agent's flow-log file, offline: the same rules.
    res = suggest_cli("--from-file", str(tmp_path / "agent-flows.log"), "--namespace", "default",
                      "--workload", "client", "-o", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["spec"] == policy["spec"]

    # 3. Enforce exactly that policy (the CLI's bytes) and replay.
    (bed.policies / "client.yaml").write_text(from_agent)
    proxy = Proxy(bed, tmp_path, upstream=bed.dns.ipv4)  # type: ignore[arg-type]
    try:
        # A second loader over the same pins: how the tests read the pinned counters.
        view = Datapath(proxy.pin_dir, nft_table=proxy.nft_table, address_label=proxy.label)
        try:
            assert "policy rejected" not in proxy.log.read_text(), proxy.log.read_text()
            assert dig(bed.client, bed.dns.ipv4, "api.one.test") == ("NOERROR", [bed.ext1.ipv4])
            assert dig(bed.client, bed.dns.ipv4, "cdn.two.test") == ("NOERROR", [bed.ext2.ipv4])
            dropped = view.counters()["dropped"]
            for ip in (bed.ext1.ipv4, bed.ext2.ipv4, bed.web.ipv4, bed.raw.ipv4):
                assert connect(bed.client, ip), ip
            assert view.counters()["dropped"] == dropped  # everything it did passes, on the first SYN

            # What it never did: a name it never resolved is refused, an address it never used dropped.
            assert dig(bed.client, bed.dns.ipv4, "never.used.test")[0] == "REFUSED"
            assert not connect(bed.client, bed.other.ipv4)
            assert view.counters()["dropped"] > dropped
            drop = proxy.wait_flow(lambda f: f["verdict"] == "DROPPED"
                                   and f.get("IP", {}).get("destination") == bed.other.ipv4)
            assert drop["drop_reason_desc"] == "POLICY_DENIED" and drop["IP"]["source"] == bed.client.ipv4
            # An allowed pod, but on a port the client never used: dropped as well.
            dropped = view.counters()["dropped"]
            assert not connect_port(bed.client, bed.web.ipv4, SIDE_PORT)
            assert view.counters()["dropped"] > dropped
            # The other workload is not policed.
            assert dig(bed.free, bed.dns.ipv4, "never.used.test") == ("NOERROR", [bed.other.ipv4])
            assert connect(bed.free, bed.other.ipv4)
        finally:
            view.close()
    finally:
        proxy.close()
