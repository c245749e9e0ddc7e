"""`flowtel dnsproxy --kube` end to end: pods and Cilium policies come from a Kubernetes API
server (tests/kubeapi: real HTTP list/watch, 410, restarts) through the official client, and
are enforced on real network-namespace pods by the real kernel.

Peers: a netns pod declared as running on another node (its spec.nodeName, or its ``node`` in
a pods file, is not the proxy's NODE_NAME) is selected by toEndpoints, never policed.

The testbed, pods and probes are test_fqdn_policy_e2e's (imported, not copied). Truth: the
pinned endpoint map (is the pod policed), dig and the client's sockets, dnsmasq's query log,
the datapath's drop counter, the proxy's log and its health endpoint.

The proxy runs with ``--reload-interval 5``: only the watch event can make it follow the API
within the 3 s these tests allow, so they check that changes are event-driven.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from dnsproxy.datapath import Datapath, uninstall
from tests.integration.test_fqdn_policy_e2e import (POLICY, REPO, WEB_PORT, Bed, Proxy, bed, connect,  # noqa: F401 - fixtures
                                                    datapath_view, dig)
from tests.kubeapi import FakeApiServer
from tests.kubeapi import objects as o

pytestmark = pytest.mark.kernel

NODE = "flowtel-e2e-node"
FOLLOW_S = 3.0  # the proxy follows a watch event well within this (measured: tens of ms)


CLIENT_SPEC = yaml.safe_load(POLICY)["spec"]  # *.short.test and allowed.example.test, DNS via the dns pod
# Cilium rejects it too: one kind of L3 selector per rule.
BROKEN_SPEC = {"endpointSelector": {}, "egress": [{"toEntities": ["world"], "toCIDR": ["10.0.0.0/8"]}]}


class KubeProxy(Proxy):
    """The imported Proxy harness (start, kill, log, flows), launched with --kube."""

    def __init__(self, bed: Bed, tmp: Path, kubeconfig: str, extra: tuple[str, ...] = ()) -> None:
        tag = f"t{os.getpid()}k"
        self.pin_dir = f"/sys/fs/bpf/flowtel/dnsproxy-test-{tag}"
        self.nft_table = f"ftdnsproxy_{tag}"
        self.label = f"lo:ft{tag}"[:15]
        self.flow_log = tmp / "proxy-flows.log"
        self.log = tmp / "proxy.log"
        with socket.socket() as s:  # a free loopback port for the health endpoint
            s.bind(("127.0.0.1", 0))
            self.health_port = s.getsockname()[1]
        self.argv = ["env", f"NODE_NAME={NODE}", sys.executable, "-m", "flowtel.cli", "dnsproxy", "--kube",
                     "--kubeconfig", kubeconfig, "--upstream", f"{bed.dns.ipv4}:53",
                     "--listen", f"169.254.54.{os.getpid() % 250 + 2}:53", "--flow-log", str(self.flow_log),
                     "--pin-dir", self.pin_dir, "--nft-table", self.nft_table, "--address-label", self.label,
                     "--health-listen", f"127.0.0.1:{self.health_port}", "--metrics-listen=",
                     "--reload-interval", "5", "--status-interval", "0.5", *extra]
        self.bed = bed
        uninstall(self.pin_dir, nft_table=self.nft_table, address_label=self.label)
        self.proc = None
        self.start()

    def health(self, path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def status(self) -> dict[str, Any]:
        lines = [line for line in self.log.read_text().splitlines() if " status: " in line]
        return json.loads(lines[-1].split(" status: ", 1)[1]) if lines else {}


class Cluster:
    def __init__(self, bed: Bed, tmp: Path) -> None:
        self.bed = bed
        self.api = FakeApiServer(bookmark_interval=1.0).start()
        self.api.create("namespaces", o.namespace("default"))
        for pod in (bed.dns, bed.dns_short, bed.web, bed.other, bed.client, bed.free):
            self.api.create("pods", o.pod(pod.name, ip=pod.ipv4, node=NODE, labels={"app": pod.name}))
        # A pod of another node with the client's labels: a toEndpoints peer, never policed here.
        self.api.create("pods", o.pod("elsewhere", ip="10.255.0.1", node="another-node", labels={"app": "client"}))
        self.kubeconfig = self.api.write_kubeconfig(str(tmp / "kubeconfig"))
        self.proxy = KubeProxy(bed, tmp, self.kubeconfig)

    def close(self) -> None:
        self.proxy.close()
        self.api.stop()


@pytest.fixture(scope="module")
def cluster(bed: Bed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:  # noqa: F811 - bed is imported
    c = Cluster(bed, tmp_path_factory.mktemp("fqdn-kube"))
    yield c
    c.close()


@pytest.fixture
def view(cluster: Cluster, datapath_view: Any) -> Iterator[Datapath]:  # noqa: F811 - imported fixture
    yield datapath_view(cluster.proxy)
    # Back to no policy, whatever the test left: the next test starts un-policed.
    api = cluster.api
    if not api.running:
        api.start()
    for name in ("client-egress", "broken-policy"):
        try:
            api.delete("ciliumnetworkpolicies", name)
        except KeyError:
            pass
    api.patch("pods", "client", lambda p: p["metadata"]["labels"].update(app="client"))


def policed_ips(view: Datapath) -> set[str]:
    """The pod addresses in the pinned fqdn_endpoints map (IPv4 is stored in the first 4 bytes)."""
    out = set()
    for k in view.endpoints.keys():
        raw = bytes(k.addr)
        out.add(socket.inet_ntop(socket.AF_INET, raw[:4]) if raw[4:] == bytes(12) else socket.inet_ntop(socket.AF_INET6, raw))
    return out


def follow(cond: Callable[[], bool], what: str) -> float:
    """Seconds until ``cond`` holds (asserting it does within FOLLOW_S)."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < FOLLOW_S, f"the proxy did not follow within {FOLLOW_S} s: {what}"
        time.sleep(0.01)
    return time.monotonic() - start


def assert_policed(bed: Bed, view: Datapath) -> None:
    """Allowed name resolves (through the proxy) and connects with its first SYN; a blocked
    name is REFUSED without reaching upstream; an unresolved address is dropped and counted."""
    bed.dns_log.write_text("")
    assert dig(bed.client, bed.dns.ipv4, "allowed.example.test") == ("NOERROR", [bed.web.ipv4])
    assert connect(bed.client, bed.web.ipv4)
    assert dig(bed.client, bed.dns.ipv4, "denied.example.test")[0] == "REFUSED"
    log = bed.dns_log.read_text()
    assert "denied.example.test" not in log and f"from {bed.client.ipv4}" not in log
    dropped = view.counters()["dropped"]
    assert not connect(bed.client, bed.other.ipv4)
    assert view.counters()["dropped"] > dropped


def assert_free(bed: Bed, view: Datapath) -> None:
    """Not policed: its DNS goes to the dns pod itself, any name resolves, anything connects."""
    bed.dns_log.write_text("")
    assert dig(bed.client, bed.dns.ipv4, "denied.example.test") == ("NOERROR", [bed.other.ipv4])
    assert f"from {bed.client.ipv4}" in bed.dns_log.read_text()
    dropped = view.counters()["dropped"]
    assert connect(bed.client, bed.other.ipv4)
    assert view.counters()["dropped"] == dropped


def test_policies_and_labels_from_the_api_are_enforced(bed: Bed, cluster: Cluster, view: Datapath) -> None:  # noqa: F811
    api, proxy = cluster.api, cluster.proxy
    assert policed_ips(view) == set()
    assert_free(bed, view)

    # A valid and an invalid policy arrive through the API: the invalid one is rejected by
    # name, the valid one polices the client within the watch latency.
    api.create("ciliumnetworkpolicies", o.cilium_network_policy("broken-policy", spec=BROKEN_SPEC))
    api.create("ciliumnetworkpolicies", o.cilium_network_policy("client-egress", spec=CLIENT_SPEC))
    took = follow(lambda: policed_ips(view) == {bed.client.ipv4}, "policy created")
    print(f"policy created -> pod policed in the kernel: {took * 1000:.0f} ms")
    rejected = [line for line in proxy.log.read_text().splitlines() if "policy rejected" in line]
    assert len(rejected) == 1 and "default/broken-policy" in rejected[0] and "combining toCIDR and toEntities" in rejected[0], rejected
    assert_policed(bed, view)
    assert proxy.status()["policies_rejected"] == 1

    # Relabelling the pod in the API takes it out of the policy's selector, and back.
    api.patch("pods", "client", lambda p: p["metadata"]["labels"].update(app="client-v2"))
    took = follow(lambda: policed_ips(view) == set(), "pod relabelled out of the selector")
    print(f"pod relabelled -> un-policed: {took * 1000:.0f} ms")
    assert_free(bed, view)
    api.patch("pods", "client", lambda p: p["metadata"]["labels"].update(app="client"))
    follow(lambda: policed_ips(view) == {bed.client.ipv4}, "pod relabelled back")
    assert_policed(bed, view)

    # Deleting the policy un-polices the pod.
    api.delete("ciliumnetworkpolicies", "client-egress")
    took = follow(lambda: policed_ips(view) == set(), "policy deleted")
    print(f"policy deleted -> un-policed: {took * 1000:.0f} ms")
    assert_free(bed, view)


def test_api_server_gone_keeps_enforcing_and_catches_up(bed: Bed, cluster: Cluster, view: Datapath) -> None:  # noqa: F811
    api, proxy = cluster.api, cluster.proxy
    api.create("ciliumnetworkpolicies", o.cilium_network_policy("client-egress", spec=CLIENT_SPEC))
    follow(lambda: policed_ips(view) == {bed.client.ipv4}, "policy created")
    errors_before = proxy.status().get("kubernetes", {}).get("api_errors", 0)

    api.stop()
    deadline = time.monotonic() + 10
    while proxy.status().get("kubernetes", {}).get("api_errors", 0) <= errors_before:
        assert time.monotonic() < deadline, f"no API error counted: {proxy.status()}"
        time.sleep(0.1)
    assert "cannot list/watch" in proxy.log.read_text() and "keeps enforcing" in proxy.log.read_text()
    # Still enforcing the last known state, and still ready (probes do not restart it).
    assert_policed(bed, view)
    code, body = proxy.health("/readyz")
    assert code == 200 and body["kubernetes"]["api_healthy"] is False, body
    assert proxy.health("/healthz")[0] == 200

    # Changed while the proxy could not watch, with the history gone (410 on its next watch):
    # it relists when the server is back and un-polices the pod.
    api.delete("ciliumnetworkpolicies", "client-egress")
    api.restart(new_resource_versions=True)
    deadline = time.monotonic() + 10
    while policed_ips(view):
        assert time.monotonic() < deadline, "the proxy did not catch up after the API server returned"
        time.sleep(0.05)
    assert_free(bed, view)
    # Every informer reconnects on its own backoff schedule; then the API counts as healthy.
    deadline = time.monotonic() + 30
    while not (body := proxy.health("/readyz")[1])["kubernetes"]["api_healthy"]:
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    assert body["status"] == "ok" and body["kubernetes"]["relists"] >= 1, body


def test_restart_without_api_server_keeps_enforcing_and_is_not_ready(bed: Bed, cluster: Cluster,  # noqa: F811
                                                                       view: Datapath) -> None:
    """A proxy that restarts while the API server is away never applies an empty view: the
    pinned datapath keeps enforcing, and it reports not ready until its first list."""
    api, proxy = cluster.api, cluster.proxy
    api.create("ciliumnetworkpolicies", o.cilium_network_policy("client-egress", spec=CLIENT_SPEC))
    follow(lambda: policed_ips(view) == {bed.client.ipv4}, "policy created")
    assert dig(bed.client, bed.dns.ipv4, "allowed.example.test") == ("NOERROR", [bed.web.ipv4])
    proxy.kill()
    api.stop()
    mark = proxy.log.read_text().count("dnsproxy ready")
    with open(proxy.log, "a") as out:
        proxy.proc = subprocess.Popen(proxy.argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            code, body = proxy.health("/readyz")
            break
        except OSError:  # not listening yet (bcc compiles first)
            assert proxy.proc.poll() is None and time.monotonic() < deadline, proxy.log.read_text()[-2000:]
            time.sleep(0.2)
    assert code == 503 and body["serving"] is False and body["kubernetes"]["synced"] is False, body
    assert policed_ips(view) == {bed.client.ipv4}
    # Unanswered meanwhile, and not leaking past the proxy to the resolver the pod asked.
    bed.dns_log.write_text("")
    assert dig(bed.client, bed.dns.ipv4, "denied.example.test")[0] == "TIMEOUT"
    assert "denied.example.test" not in bed.dns_log.read_text()
    assert connect(bed.client, bed.web.ipv4)  # learned before the restart: still allowed
    dropped = view.counters()["dropped"]
    assert not connect(bed.client, bed.other.ipv4)
    assert view.counters()["dropped"] > dropped
    assert proxy.log.read_text().count("dnsproxy ready") == mark
    api.start()
    deadline = time.monotonic() + 30
    while proxy.log.read_text().count("dnsproxy ready") == mark:
        assert proxy.proc.poll() is None and time.monotonic() < deadline, proxy.log.read_text()[-2000:]
        time.sleep(0.1)
    assert proxy.health("/readyz")[0] == 200
    assert_policed(bed, view)


def test_policy_directory_adds_to_the_api_policies(bed: Bed, cluster: Cluster, view: Datapath,  # noqa: F811
                                                   datapath_view: Any, tmp_path: Path) -> None:  # noqa: F811
    """--kube with --policies: the directory's policies apply beside the API's, and an
    invalid API policy still leaves them (and the valid ones) in force."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "client.yaml").write_text(POLICY)
    cluster.proxy.stop()  # one proxy at a time: they would share the redirect's mark and route table
    both = KubeProxy(bed, tmp_path, cluster.kubeconfig, extra=("--policies", str(policies)))
    try:
        mine = datapath_view(both)
        follow(lambda: policed_ips(mine) == {bed.client.ipv4}, "file policy applied")
        assert_policed(bed, mine)
        cluster.api.create("ciliumnetworkpolicies", o.cilium_network_policy("broken-policy", spec=BROKEN_SPEC))
        follow(lambda: "default/broken-policy" in both.log.read_text(), "API policy rejected")
        assert policed_ips(mine) == {bed.client.ipv4}
        assert_policed(bed, mine)
    finally:
        both.close()
        cluster.proxy.start()


def allowed_destinations(view: Datapath, pod_ip: str) -> set[str]:
    """IPv4 host entries (not holes) of ``pod_ip`` in the pinned fqdn_cidr LPM map."""
    out = set()
    for k, v in view.cidr.items():
        raw_dst = bytes(k.dst)
        if bytes(k.pod)[:4] == socket.inet_aton(pod_ip) and k.prefixlen == 128 + 128 and not v.deny \
                and raw_dst[:12] == bytes(10) + b"\xff\xff":
            out.add(socket.inet_ntoa(raw_dst[12:]))
    return out


# The client's policy plus toEndpoints to "remote-db", a pod of another node.
PEER_SPEC = {**CLIENT_SPEC, "egress": [*CLIENT_SPEC["egress"], {
    "toEndpoints": [{"matchLabels": {"app": "remote-db"}}],
    "toPorts": [{"ports": [{"port": str(WEB_PORT), "protocol": "TCP"}]}]}]}


def assert_denied(bed: Bed, view: Datapath, proxy: Proxy, dst: str) -> None:
    """The client's first SYN to ``dst`` is dropped, counted, and reported POLICY_DENIED."""
    def denied_flows() -> int:
        return sum(1 for f in proxy.flows() if f["verdict"] == "DROPPED" and f.get("IP", {}).get("destination") == dst
                   and f.get("drop_reason_desc") == "POLICY_DENIED")

    dropped, flows = view.counters()["dropped"], denied_flows()
    assert not connect(bed.client, dst)
    assert view.counters()["dropped"] > dropped
    deadline = time.monotonic() + 5  # the proxy reads the denied counters once a second
    while denied_flows() <= flows:
        assert time.monotonic() < deadline, f"no POLICY_DENIED flow for {dst}"
        time.sleep(0.05)


def test_to_endpoints_selects_a_pod_on_another_node(bed: Bed, cluster: Cluster, view: Datapath) -> None:  # noqa: F811
    """toEndpoints resolves against every node's pods. The "other" netns pod is declared in the
    API as ``remote-db`` on another node (its spec.nodeName is not the proxy's NODE_NAME) and is
    reachable from the client, as a pod of another node is through the node's routes. Selected,
    the client's first SYN passes; relabelled out of the selector, or deleted, its packets are
    dropped and reported POLICY_DENIED. Truth: the pinned LPM map, the client's sockets, the
    datapath's drop counter and the proxy's drop flows."""
    api, proxy = cluster.api, cluster.proxy
    client, remote = bed.client.ipv4, bed.other.ipv4
    api.delete("pods", "other")
    try:
        api.create("pods", o.pod("remote-db", ip=remote, node="another-node", labels={"app": "remote-db"}))
        api.create("ciliumnetworkpolicies", o.cilium_network_policy("client-egress", spec=PEER_SPEC))
        took = follow(lambda: policed_ips(view) == {client} and remote in allowed_destinations(view, client),
                      "policy selecting a peer on another node")
        print(f"policy created -> peer on another node allowed in the kernel: {took * 1000:.0f} ms")
        assert policed_ips(view) == {client}  # the peer is not policed, nor is "elsewhere" (app=client, another node)
        dropped = view.counters()["dropped"]
        assert connect(bed.client, remote)
        assert view.counters()["dropped"] == dropped

        api.patch("pods", "remote-db", lambda p: p["metadata"]["labels"].update(app="remote-db-v2"))
        took = follow(lambda: remote not in allowed_destinations(view, client), "peer relabelled out of the selector")
        print(f"peer relabelled out of the selector -> entry removed: {took * 1000:.0f} ms")
        assert_denied(bed, view, proxy, remote)

        api.patch("pods", "remote-db", lambda p: p["metadata"]["labels"].update(app="remote-db"))
        took = follow(lambda: remote in allowed_destinations(view, client), "peer relabelled back")
        print(f"peer relabelled back -> entry added: {took * 1000:.0f} ms")
        assert connect(bed.client, remote)

        api.delete("pods", "remote-db")
        took = follow(lambda: remote not in allowed_destinations(view, client), "peer deleted")
        print(f"peer deleted -> entry removed: {took * 1000:.0f} ms")
        assert_denied(bed, view, proxy, remote)
        # The DNS rule's endpoints stay (the policy file's DNS rule selects both resolver pods).
        assert allowed_destinations(view, client) == {bed.dns.ipv4, bed.dns_short.ipv4}
    finally:
        try:
            api.delete("pods", "remote-db")
        except KeyError:
            pass
        api.create("pods", o.pod("other", ip=remote, node=NODE, labels={"app": "other"}))


class FilesProxy(Proxy):
    """The imported Proxy harness with a policies directory and a pods file, and NODE_NAME."""

    def __init__(self, bed: Bed, tmp: Path, policies: Path, pods: Path) -> None:
        tag = f"t{os.getpid()}f"
        self.pin_dir = f"/sys/fs/bpf/flowtel/dnsproxy-test-{tag}"
        self.nft_table = f"ftdnsproxy_{tag}"
        self.label = f"lo:ft{tag}"[:15]
        self.flow_log = tmp / "proxy-flows.log"
        self.log = tmp / "proxy.log"
        self.argv = ["env", f"NODE_NAME={NODE}", sys.executable, "-m", "flowtel.cli", "dnsproxy",
                     "--policies", str(policies), "--pods", str(pods), "--upstream", f"{bed.dns.ipv4}:53",
                     "--listen", f"169.254.55.{os.getpid() % 250 + 2}:53", "--flow-log", str(self.flow_log),
                     "--pin-dir", self.pin_dir, "--nft-table", self.nft_table, "--address-label", self.label,
                     "--health-listen=", "--metrics-listen=", "--reload-interval", "0.2", "--status-interval", "0"]
        self.bed = bed
        uninstall(self.pin_dir, nft_table=self.nft_table, address_label=self.label)
        self.proc = None
        self.start()


def test_pods_file_lists_peers_of_other_nodes(bed: Bed, cluster: Cluster, datapath_view: Any,  # noqa: F811
                                              tmp_path: Path) -> None:
    """Files mode, as the API: a pod whose ``node`` is not $NODE_NAME is a toEndpoints peer (its
    address allowed, its egress not policed even when a policy's endpointSelector matches it);
    the file relabelling it out of the selector drops the client's traffic to it."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "client.yaml").write_text(yaml.safe_dump({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "client-egress", "namespace": "default"}, "spec": PEER_SPEC}))
    pods_file = tmp_path / "pods.yaml"

    def write_pods(remote_app: str) -> None:
        pods = [{"name": p.name, "namespace": "default", "ips": [p.ipv4], "labels": {"app": p.name}, "node": NODE}
                for p in (bed.dns, bed.web, bed.client, bed.free)]
        pods.append({"name": "remote-db", "namespace": "default", "ips": [bed.other.ipv4],
                     "labels": {"app": remote_app}, "node": "another-node"})
        pods.append({"name": "elsewhere", "namespace": "default", "ips": ["10.255.0.1"],
                     "labels": {"app": "client"}, "node": "another-node"})
        pods_file.write_text(yaml.safe_dump({"pods": pods}))

    write_pods("remote-db")
    cluster.proxy.stop()  # one proxy at a time: they would share the redirect's mark and route table
    files = FilesProxy(bed, tmp_path, policies, pods_file)
    try:
        view = datapath_view(files)
        follow(lambda: policed_ips(view) == {bed.client.ipv4}
               and bed.other.ipv4 in allowed_destinations(view, bed.client.ipv4), "pods file applied")
        dropped = view.counters()["dropped"]
        assert connect(bed.client, bed.other.ipv4)
        assert view.counters()["dropped"] == dropped
        write_pods("remote-db-v2")
        follow(lambda: bed.other.ipv4 not in allowed_destinations(view, bed.client.ipv4), "peer relabelled in the file")
        assert_denied(bed, view, files, bed.other.ipv4)
        assert policed_ips(view) == {bed.client.ipv4}
    finally:
        files.close()
        cluster.proxy.start()
