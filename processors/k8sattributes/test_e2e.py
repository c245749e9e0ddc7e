"""Kubernetes names end to end on the real kernel: network-namespace pods whose addresses
the stand-in API server lists, `flowtel run` with the ebpf receiver and k8sattributes
(kubeConfig auth against that server), and the Hubble JSON it writes.

Checked: both ends of TCP, UDP and DNS flows carry pod, namespace and workload; an update
made while the API server is down arrives after it restarts; a deleted pod is still named
within its grace period and not after it; a new pod reusing the address gets the new name.
"""
from __future__ import annotations

from tests.support.flowlog import read_flow_log

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from testbed import Pod, Testbed, send_tcp, send_udp
from tests.kubeapi import FakeApiServer
from tests.kubeapi import objects as o

pytestmark = pytest.mark.kernel

GRACE_S = 3.0
NODE = "test-node"
SETTLE_S = 0.5  # API change → watch event → agent caches: milliseconds; this is slack


@pytest.fixture
def bed() -> Iterator[Testbed]:
    Testbed.cleanup_stale()
    with Testbed() as tb:
        yield tb


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval=0.5).start()
    try:
        yield server
    finally:
        server.stop()


def tc_attached(ifname: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", ifname, "ingress"], capture_output=True, text=True).stdout
    return " bpf " in out


class Agent:
    def __init__(self, tmp: Path, glob: str, kubeconfig: str) -> None:
        self.flow_log = tmp / "flows.log"
        config = tmp / "flowtel.yaml"
        config.write_text(f"""
receivers:
  ebpf:
    interfaces: ["{glob}"]
    collection_interval: 500ms
processors:
  k8sattributes:
    auth_type: kubeConfig
    kubeconfig: {kubeconfig}
    deleted_pod_grace: {GRACE_S}s
    initial_sync_timeout: 10s
    backoff: {{initial_interval: 50ms, max_interval: 300ms}}
exporters:
  file:
    path: {self.flow_log}
    max_size_mb: 100
service:
  pipelines:
    logs:
      receivers: [ebpf]
      processors: [k8sattributes]
      exporters: [file]
""")
        self.stderr = tmp / "agent.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowtel.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=self.stderr.open("w"), env={**os.environ, "NODE_NAME": NODE},
        )

    def wait_attached(self, pods: list[Pod], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(tc_attached(p.host_ifname) for p in pods):
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.stderr.read_text()}")
            assert time.monotonic() < deadline, f"not attached: {self.stderr.read_text()}"
            time.sleep(0.1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def flows(self) -> list[dict[str, Any]]:
        return [env["flow"] for env in read_flow_log(self.flow_log) if "flow" in env]


def who(end: dict[str, Any]) -> str:
    workloads = ",".join(f"{w['kind']}/{w['name']}" for w in end.get("workloads", ()))
    if end.get("pod_name"):
        return f"{end['namespace']}/{end['pod_name']} [{workloads}]"
    return f"id:{end.get('identity', 0)} {','.join(end.get('labels', ()))}".strip()


def udp_flows(flows: list[dict[str, Any]], src_port: int) -> list[dict[str, Any]]:
    return [f for f in flows if f.get("l4", {}).get("UDP", {}).get("source_port") == src_port]


def test_pods_named_through_restart_deletion_and_reuse(bed: Testbed, api: FakeApiServer, tmp_path: Path) -> None:
    client, server, dns = (bed.add_pod(n) for n in ("client", "server", "dns"))
    bed.start_tcp_sink(server, 8080)
    bed.start_udp_sink(server, 9000)
    bed.start_dnsmasq(dns, hosts={"payments.shop.svc.cluster.local": [server.ipv4]})

    api.create("namespaces", o.namespace("shop"))
    api.create("namespaces", o.namespace("kube-system"))
    api.create("nodes", o.node(NODE, internal_ip="192.0.2.10", pod_cidr=str(bed.ipv4_network)))
    api.create("replicasets", o.replicaset("frontend-6d4b9c", "shop", deployment="frontend"))
    api.create("replicasets", o.replicaset("coredns-5d78c9", "kube-system", deployment="coredns"))
    api.create("pods", o.pod("frontend-6d4b9c-x2k8p", "shop", ip=client.ipv4, node=NODE,
                             labels={"app": "frontend", "pod-template-hash": "6d4b9c"}, owner=("ReplicaSet", "frontend-6d4b9c")))
    api.create("pods", o.pod("payments-0", "shop", ip=server.ipv4, node=NODE, labels={"app": "payments"},
                             owner=("StatefulSet", "payments")))
    api.create("pods", o.pod("coredns-5d78c9-q7w2e", "kube-system", ip=dns.ipv4, node=NODE,
                             labels={"k8s-app": "kube-dns", "pod-template-hash": "5d78c9"}, owner=("ReplicaSet", "coredns-5d78c9")))
    kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))

    agent = Agent(tmp_path, bed.interface_glob, kubeconfig)
    try:
        agent.wait_attached([client, server, dns])
        tcp = send_tcp(client, server.ipv4, 8080, 20_000)
        client.exec(["dig", "+short", "+tries=1", "+time=1", f"@{dns.ipv4}", "payments.shop.svc.cluster.local"])
        before = send_udp(client, server.ipv4, 9000, 3, 100)

        # The API server dies; a pod appears meanwhile; the server comes back with its history.
        api.stop()
        late = bed.add_pod("late")
        api.create("pods", o.pod("checkout-7f8e9d-m3n4b", "shop", ip=late.ipv4, node=NODE,
                                 labels={"app": "checkout", "pod-template-hash": "7f8e9d"}, owner=("ReplicaSet", "checkout-7f8e9d")))
        time.sleep(1.0)  # the agent's watches fail and back off meanwhile
        api.start()
        agent.wait_attached([late])
        time.sleep(1.0)
        from_late = send_udp(late, server.ipv4, 9000, 3, 100)

        # payments-0 is deleted: named within the grace, not after it.
        api.delete("pods", "payments-0", "shop")
        deleted_at = time.time()
        time.sleep(SETTLE_S)
        in_grace = send_udp(client, server.ipv4, 9000, 3, 100)
        time.sleep(max(0.0, deleted_at + GRACE_S + 1.0 - time.time()))
        after_grace = send_udp(client, server.ipv4, 9000, 3, 100)
        # Drained and named before the next pod exists, and more than the clock-skew
        # allowance (creationTimestamp has whole seconds) before its creation.
        time.sleep(3.0)

        # A new pod gets the address: the new name.
        api.create("pods", o.pod("payments-1", "shop", ip=server.ipv4, node=NODE, labels={"app": "payments"},
                                 owner=("StatefulSet", "payments")))
        time.sleep(SETTLE_S)
        reused = send_udp(client, server.ipv4, 9000, 3, 100)
        time.sleep(1.2)  # one more collection interval
    finally:
        assert agent.stop() == 0, agent.stderr.read_text()
    stderr = agent.stderr.read_text()
    assert "Traceback" not in stderr, stderr
    # What the tc programs saw on this test's veths. Node-wide kernel events (drops, TCP
    # resets from tracepoints) also report other processes' testbeds on a shared machine.
    veths = {p.host_ifname for p in (client, server, dns, late)}
    flows = [f for f in agent.flows() if f.get("interface", {}).get("name") in veths]

    frontend = "shop/frontend-6d4b9c-x2k8p [Deployment/frontend]"
    payments0 = "shop/payments-0 [StatefulSet/payments]"
    coredns = "kube-system/coredns-5d78c9-q7w2e [Deployment/coredns]"

    # TCP, both directions, on both veths: both ends named.
    tcp_flows = [f for f in flows if "TCP" in f.get("l4", {}) and tcp.src_port in (
        f["l4"]["TCP"].get("source_port"), f["l4"]["TCP"].get("destination_port"))]
    assert {f["interface"]["name"] for f in tcp_flows} == {client.host_ifname, server.host_ifname}
    for f in tcp_flows:
        ends = {who(f["source"]), who(f["destination"])}
        assert ends == {frontend, payments0}, f
        assert f["source"]["labels"] and f["source"]["identity"] >= 256

    # DNS: every flow to or from port 53, L3/L4 and L7 alike.
    dns_flows = [f for f in flows if any(53 in (p.get("source_port"), p.get("destination_port"))
                                         for p in f.get("l4", {}).values())]
    assert dns_flows
    for f in dns_flows:
        assert {who(f["source"]), who(f["destination"])} == {frontend, coredns}, f
    dns_records = [f for f in dns_flows if f.get("Type") == "L7"]
    assert {f["l7"]["type"] for f in dns_records} == {"REQUEST", "RESPONSE"}, dns_records
    for f in dns_records:
        assert f["l7"]["dns"]["query"].startswith("payments.shop.svc")

    def names(sent: Any) -> set[tuple[str, str]]:
        got = {(who(f["source"]), who(f["destination"])) for f in udp_flows(flows, sent.src_port)}
        assert got, f"no flows for {sent}"
        return got

    assert names(before) == {(frontend, payments0)}
    assert names(from_late) == {("shop/checkout-7f8e9d-m3n4b [Deployment/checkout]", payments0)}
    assert names(in_grace) == {(frontend, payments0)}
    # After the grace the address is unnamed: inside this node's pod CIDR, so not world.
    assert names(after_grace) == {(frontend, "id:0")}
    assert names(reused) == {(frontend, "shop/payments-1 [StatefulSet/payments]")}
