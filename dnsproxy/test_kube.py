"""dnsproxy's Kubernetes source against the API stand-in (tests/kubeapi: real HTTP list/watch,
410 Gone, restarts) through the official client: no kernel needed, so these run everywhere."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from dnsproxy.kube import KubeOptions, KubeSource, KubeState
from flowtel.lib.policy import NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL, PolicySet
from flowtel.errors import StartError
from tests.kubeapi import FakeApiServer
from tests.kubeapi import objects as o

NODE = "node-1"
CLIENT_POLICY = {
    "endpointSelector": {"matchLabels": {"app": "client"}},
    "egress": [{"toFQDNs": [{"matchPattern": "*.allowed.test"}], "toPorts": [{"ports": [{"port": "443"}]}]}],
}
# Cilium rejects it too: one kind of L3 selector per rule.
BROKEN = {"endpointSelector": {}, "egress": [{"toEntities": ["world"], "toCIDR": ["10.0.0.0/8"]}]}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.2) as s:
        s.create("namespaces", o.namespace("default", labels={"team": "blue"}))
        s.create("pods", o.pod("client", ip="10.1.0.1", node=NODE, labels={"app": "client"}))
        s.create("pods", o.pod("other-node", ip="10.1.0.2", node="node-2", labels={"app": "client"}))
        s.create("pods", o.pod("hostnet", ip="192.0.2.10", node=NODE, labels={"app": "client"}, host_network=True))
        s.create("pods", o.pod("done", ip="10.1.0.3", node=NODE, labels={"app": "client"}, phase="Succeeded"))
        yield s


@pytest.fixture
def source(api: FakeApiServer, tmp_path: Path) -> Iterator[tuple[KubeSource, threading.Event]]:
    changed = threading.Event()
    src = KubeSource.connect(api.write_kubeconfig(str(tmp_path / "kubeconfig")), NODE, on_change=changed.set,
                             options=KubeOptions(request_timeout=2, watch_timeout=5, backoff_initial=0.05,
                                                 backoff_max=0.3))
    src.start()
    wait(lambda: src.synced, "first sync")
    yield src, changed
    src.shutdown()


def wait(cond: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def policed(state: KubeState) -> list[str]:
    return [p.key for p in PolicySet(state.policies, state.pods, node=NODE, endpoints=state.endpoints).policed_pods()]


def test_pods_of_this_node_with_cilium_labels(source: tuple[KubeSource, threading.Event], api: FakeApiServer) -> None:
    src, _ = source
    state = src.state()
    # This node's pods (not hostNetwork or finished ones) are the policed candidates; every
    # node's pods are listed (one cluster-wide informer) and indexed as toEndpoints peers.
    assert [p.key for p in state.pods] == ["default/client"]
    assert state.pods[0].ips == ("10.1.0.1",) and state.pods[0].node == NODE
    labels = state.pods[0].labels
    assert labels["app"] == "client" and labels[NAMESPACE_LABELS_PREFIX + "team"] == "blue"
    assert labels[SERVICE_ACCOUNT_LABEL] == "default"
    pod_lists = [r for r in api.requests if r.path == "/api/v1/pods"]
    assert pod_lists and all("fieldSelector" not in r.query for r in pod_lists)
    assert len(state.endpoints) == 2 and src.cluster_pods == 2  # client and other-node
    counts = src.counters()
    assert (counts["cluster_pods"], counts["local_pods"], counts["identities"]) == (2, 1, 1)  # same labels
    # A namespace label change reaches the pod's labels (a namespace selector follows it).
    api.patch("namespaces", "default", lambda n: n["metadata"]["labels"].update(team="red"), namespace="")
    wait(lambda: src.state().pods[0].labels[NAMESPACE_LABELS_PREFIX + "team"] == "red", "namespace relabel")


def test_policies_follow_the_api(source: tuple[KubeSource, threading.Event], api: FakeApiServer) -> None:
    src, changed = source
    assert policed(src.state()) == []
    changed.clear()
    api.create("ciliumnetworkpolicies", o.cilium_network_policy("client-egress", spec=CLIENT_POLICY))
    api.create("ciliumnetworkpolicies", o.cilium_network_policy("broken-policy", spec=BROKEN))
    assert changed.wait(2), "no change callback for a watch event"
    wait(lambda: len(src.state().errors) == 1 and policed(src.state()) == ["default/client"], "policy applied")
    (error,) = src.state().errors
    assert "default/broken-policy" in error and "combining toCIDR and toEntities" in error
    policy = PolicySet(src.state().policies, src.state().pods, node=NODE, endpoints=src.state().endpoints)
    client = policy.pod_by_ip("10.1.0.1")
    assert client is not None and policy.fqdn_l4(client, "api.allowed.test") is not None
    assert policy.fqdn_l4(client, "api.blocked.test") is None
    # Fixing the broken policy replaces its error; relabelling the pod un-polices it.
    api.patch("ciliumnetworkpolicies", "broken-policy", lambda p: p.update(spec=CLIENT_POLICY))
    wait(lambda: not src.state().errors and len(src.state().policies) == 2, "fixed policy")
    api.patch("pods", "client", lambda p: p["metadata"]["labels"].update(app="server"))
    wait(lambda: policed(src.state()) == [], "relabelled pod un-policed")
    api.patch("pods", "client", lambda p: p["metadata"]["labels"].update(app="client"))
    wait(lambda: policed(src.state()) == ["default/client"], "relabelled pod policed again")
    # Deleting the policies: nothing is policed; a clusterwide one polices across namespaces.
    api.delete("ciliumnetworkpolicies", "client-egress")
    api.delete("ciliumnetworkpolicies", "broken-policy")
    wait(lambda: not src.state().policies and policed(src.state()) == [], "policies deleted")
    api.create("ciliumclusterwidenetworkpolicies", o.cilium_clusterwide_network_policy("all", spec=CLIENT_POLICY))
    wait(lambda: policed(src.state()) == ["default/client"], "clusterwide policy")
    assert src.state().policies[0].namespace is None


def test_api_server_gone_keeps_the_state_and_catches_up(source: tuple[KubeSource, threading.Event],
                                                         api: FakeApiServer, caplog: pytest.LogCaptureFixture) -> None:
    src, _ = source
    api.create("ciliumnetworkpolicies", o.cilium_network_policy("client-egress", spec=CLIENT_POLICY))
    wait(lambda: policed(src.state()) == ["default/client"], "policy applied")
    api.stop()
    wait(lambda: int(str(src.counters()["api_errors"])) >= 4, "errors counted while the server is down")
    assert policed(src.state()) == ["default/client"] and src.counters()["api_healthy"] is False
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "keeps enforcing" in errors[0] and "--kubeconfig" not in errors[0], errors
    # Changed while nobody watched, and the history is gone (410 on the next watch): relist.
    api.delete("ciliumnetworkpolicies", "client-egress")
    api.restart(new_resource_versions=True)
    wait(lambda: policed(src.state()) == [], "change made during the outage")
    # Each informer reconnects on its own backoff schedule (at most 0.3 s here).
    wait(lambda: src.counters()["api_healthy"] is True, "every informer back")
    assert int(str(src.counters()["relists"])) >= 1


def test_unusable_kubeconfig_is_a_start_error_with_the_proxys_remedy(tmp_path: Path) -> None:
    with pytest.raises(StartError, match="does not exist") as exc:
        KubeSource.connect(str(tmp_path / "missing"), NODE)
    assert "--kubeconfig" in exc.value.remedy


def test_missing_crd_keeps_the_source_unsynced_and_says_why(api: FakeApiServer, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A cluster without Cilium's CRDs answers 404 for the policy lists: the source is never
    synced with a partial view (so the proxy stays unready), and the error says what to install."""
    api.fail_next("ciliumclusterwidenetworkpolicies", 404, times=3, watch=False)
    src = KubeSource.connect(api.write_kubeconfig(str(tmp_path / "kubeconfig")), NODE,
                             options=KubeOptions(request_timeout=2, watch_timeout=5, backoff_initial=0.05,
                                                 backoff_max=0.1))
    src.start()
    try:
        wait(lambda: int(str(src.counters()["api_errors"])) >= 2, "404s counted")
        assert src.unsynced() == ["ciliumclusterwidenetworkpolicies"]
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "404" in errors[0] and "CustomResourceDefinition" in errors[0], errors
        # Installed (served) now: the list succeeds and the source is complete.
        wait(lambda: src.synced, "sync once the resource is served")
    finally:
        src.shutdown()


def test_pods_come_from_one_source_and_kube_needs_the_node_name(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from dnsproxy.run import main
    from flowtel.cli import build_parser

    args = build_parser().parse_args(["dnsproxy", "--kube", "--pods", "pods.yaml"])
    assert main(args) == 2 and "--pods and --kube exclude each other" in capsys.readouterr().err
    monkeypatch.delenv("NODE_NAME", raising=False)
    args = build_parser().parse_args(["dnsproxy", "--kubeconfig", "kc.yaml", "--policies", "dir"])
    assert main(args) == 2 and "NODE_NAME" in capsys.readouterr().err and args.kube is True


def test_peers_on_other_nodes_resolve_to_endpoints_and_follow_the_api(
        source: tuple[KubeSource, threading.Event], api: FakeApiServer) -> None:
    """toEndpoints selects pods of every node: a peer appearing, relabelled, moving address,
    in a relabelled namespace or deleted changes the addresses at once, and wakes the proxy;
    a change no selector in use sees does not."""
    src, changed = source
    api.create("namespaces", o.namespace("data", labels={"tier": "storage"}))
    api.create("ciliumnetworkpolicies", o.cilium_network_policy("client-egress", spec={
        "endpointSelector": {"matchLabels": {"app": "client"}},
        "egress": [{"toEndpoints": [{"matchLabels": {"io.kubernetes.pod.namespace": "data",
                                                     NAMESPACE_LABELS_PREFIX + "tier": "storage", "app": "db"}}]}]}))
    api.create("pods", o.pod("db-0", "data", ip="10.2.0.1", node="node-2", labels={"app": "db"}))
    api.create("pods", o.pod("db-host", "data", ip="192.0.2.20", node="node-3", labels={"app": "db"},
                             host_network=True))  # the node's identity in Cilium, not a pod's

    def addresses() -> set[str] | None:
        state = src.state()
        ps = PolicySet(state.policies, state.pods, node=NODE, endpoints=state.endpoints)
        policed = ps.policed_pods()
        return {str(e.network) for e in ps.cidr_entries(policed[0])} if policed else None

    wait(lambda: addresses() == {"10.2.0.1/32"}, "peer on another node selected")
    changed.clear()
    api.create("pods", o.pod("web", "data", ip="10.2.0.9", node="node-2", labels={"app": "web"}))
    api.wait_for_watch("pods")
    wait(lambda: src.cluster_pods == 4, "unselected peer indexed")
    assert not changed.is_set(), "a peer no selector selects woke the proxy"
    api.patch("pods", "db-0", lambda p: p["status"].update(podIP="10.2.0.2", podIPs=[{"ip": "10.2.0.2"}]),
              namespace="data")
    wait(lambda: addresses() == {"10.2.0.2/32"} and changed.is_set(), "peer address moved")
    api.patch("pods", "web", lambda p: p["metadata"]["labels"].update(app="db"), namespace="data")
    wait(lambda: addresses() == {"10.2.0.2/32", "10.2.0.9/32"}, "peer relabelled into the selector")
    api.patch("namespaces", "data", lambda n: n["metadata"]["labels"].update(tier="cold"), namespace="")
    wait(lambda: addresses() == set(), "namespace relabelled out of the selector")
    api.patch("namespaces", "data", lambda n: n["metadata"]["labels"].update(tier="storage"), namespace="")
    wait(lambda: addresses() == {"10.2.0.2/32", "10.2.0.9/32"}, "namespace relabelled back")
    api.delete("pods", "db-0", namespace="data")
    wait(lambda: addresses() == {"10.2.0.9/32"}, "peer deleted")
