"""The stand-in API server itself, over plain HTTP: its list/watch semantics are what the
k8sattributes tests rely on, so they are checked on their own."""
from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any, Iterator

import pytest

from tests.kubeapi import FakeApiServer
from tests.kubeapi import objects as o


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.05) as s:
        yield s


def get(server: FakeApiServer, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    return resp.status, body


def watch(server: FakeApiServer, path: str) -> list[dict[str, Any]]:
    """Every event of one watch, until the server ends it (timeoutSeconds) or errors."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", path)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    events = [json.loads(line) for line in resp.read().splitlines() if line]
    conn.close()
    return events


def test_list_versions_selectors_and_pages(server: FakeApiServer) -> None:
    server.create("pods", o.pod("a", "x", ip="10.0.0.1", node="n1", labels={"app": "a"}))
    server.create("pods", o.pod("b", "y", ip="10.0.0.2", node="n2", labels={"app": "b"}))
    server.create("pods", o.pod("c", "y", ip="10.0.0.3", node="n1"))
    status, body = get(server, "/api/v1/pods")
    assert status == 200 and body["kind"] == "PodList" and body["metadata"]["resourceVersion"] == str(server.resource_version)
    assert [p["metadata"]["resourceVersion"] for p in body["items"]] == ["2", "3", "4"]
    assert [p["metadata"]["name"] for p in get(server, "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1")[1]["items"]] == ["a", "c"]
    assert [p["metadata"]["name"] for p in get(server, "/api/v1/namespaces/y/pods")[1]["items"]] == ["b", "c"]
    assert [p["metadata"]["name"] for p in get(server, "/api/v1/pods?labelSelector=app%20in%20(a,b),app!=a")[1]["items"]] == ["b"]
    first = get(server, "/api/v1/pods?limit=2")[1]
    assert len(first["items"]) == 2 and first["metadata"]["remainingItemCount"] == 1
    server.create("pods", o.pod("d", "z", ip="10.0.0.4"))  # not in the snapshot the pages come from
    rest = get(server, f"/api/v1/pods?limit=2&continue={first['metadata']['continue']}")[1]
    assert [p["metadata"]["name"] for p in rest["items"]] == ["c"] and "continue" not in rest["metadata"]
    server.compact()
    assert get(server, f"/api/v1/pods?limit=2&continue={first['metadata']['continue']}")[0] == 410


def test_watch_from_a_version_with_selector_transitions_and_bookmarks(server: FakeApiServer) -> None:
    server.create("pods", o.pod("a", ip="10.0.0.1", node="n1"))
    rv = server.resource_version

    def changes() -> None:
        time.sleep(0.1)
        server.create("pods", o.pod("pending", ip="10.0.0.2", node=""))
        server.patch("pods", "pending", lambda p: p["spec"].update(nodeName="n1"))  # bound: enters the selector
        server.patch("pods", "a", lambda p: p["spec"].update(nodeName="n2"))  # leaves it
        server.create("pods", o.pod("elsewhere", ip="10.0.0.3", node="n2"))

    threading.Thread(target=changes).start()
    events = watch(server, f"/api/v1/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"
                           "&timeoutSeconds=1&fieldSelector=spec.nodeName%3Dn1")
    kinds = [(e["type"], e["object"]["metadata"].get("name")) for e in events if e["type"] != "BOOKMARK"]
    assert kinds == [("ADDED", "pending"), ("DELETED", "a")]
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks and int(bookmarks[-1]["object"]["metadata"]["resourceVersion"]) == server.resource_version


def test_watch_without_version_starts_with_the_current_objects(server: FakeApiServer) -> None:
    server.create("nodes", o.node("n1", internal_ip="192.168.0.1"))
    events = watch(server, "/api/v1/nodes?watch=true&timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "n1")]


def test_too_old_resource_version_is_410_gone(server: FakeApiServer) -> None:
    server.create("pods", o.pod("a", ip="10.0.0.1"))
    rv = server.resource_version
    server.create("pods", o.pod("b", ip="10.0.0.2"))
    server.compact()
    (event,) = watch(server, f"/api/v1/pods?watch=true&resourceVersion={rv}")
    assert event["type"] == "ERROR" and event["object"]["code"] == 410 and "too old resource version" in event["object"]["message"]
    # Bounded history compacts by itself too.
    small = FakeApiServer(history_limit=2).start()
    try:
        for i in range(4):
            small.create("pods", o.pod(f"p{i}", ip=f"10.0.0.{i + 1}"))
        assert watch(small, "/api/v1/pods?watch=true&resourceVersion=2")[0]["object"]["code"] == 410
    finally:
        small.stop()


def test_restart_keeps_the_port_and_the_store(server: FakeApiServer) -> None:
    server.create("pods", o.pod("a", ip="10.0.0.1"))
    port, rv = server.port, server.resource_version
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        get(server, "/api/v1/pods")
    server.create("pods", o.pod("b", ip="10.0.0.2"))
    server.start()
    assert server.port == port
    events = watch(server, f"/api/v1/pods?watch=true&resourceVersion={rv}&timeoutSeconds=1")
    assert [e["object"]["metadata"]["name"] for e in events] == ["b"]
    server.restart(new_resource_versions=True)
    assert watch(server, f"/api/v1/pods?watch=true&resourceVersion={rv}")[0]["object"]["code"] == 410


def test_injected_failures_and_auth() -> None:
    with FakeApiServer(token="t") as s:
        assert get(s, "/api/v1/pods")[0] == 401
    with FakeApiServer() as s:
        s.fail_next("pods", 503)
        assert get(s, "/api/v1/pods")[0] == 503
        assert get(s, "/api/v1/pods")[0] == 200
        assert get(s, "/api/v1/nothing")[0] == 404


def test_cilium_custom_resources_through_the_official_client(server: FakeApiServer, tmp_path: Any) -> None:
    """cilium.io/v2 policies are served as the API serves custom resources: the official
    client's CustomObjectsApi lists them (all namespaces, one namespace, clusterwide), gets
    one, and watches them with resourceVersion; unknown groups and misplaced scopes are 404."""
    from kubernetes import client, config

    spec = {"endpointSelector": {"matchLabels": {"app": "a"}}, "egress": [{"toFQDNs": [{"matchName": "x.test"}]}]}
    server.create("ciliumnetworkpolicies", o.cilium_network_policy("p1", "x", spec=spec))
    server.create("ciliumnetworkpolicies", o.cilium_network_policy("p2", "y", spec=spec))
    server.create("ciliumclusterwidenetworkpolicies", o.cilium_clusterwide_network_policy("c1", spec=spec))
    cfg = client.Configuration()
    config.load_kube_config(config_file=server.write_kubeconfig(str(tmp_path / "kubeconfig")), client_configuration=cfg)
    with client.ApiClient(cfg) as api:
        custom = client.CustomObjectsApi(api)
        every = custom.list_cluster_custom_object("cilium.io", "v2", "ciliumnetworkpolicies")
        assert every["kind"] == "CiliumNetworkPolicyList" and every["apiVersion"] == "cilium.io/v2"
        assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in every["items"]] == [("x", "p1"), ("y", "p2")]
        assert all(i["kind"] == "CiliumNetworkPolicy" and i["spec"] == spec for i in every["items"])
        one_ns = custom.list_namespaced_custom_object("cilium.io", "v2", "y", "ciliumnetworkpolicies")
        assert [i["metadata"]["name"] for i in one_ns["items"]] == ["p2"]
        got = custom.get_cluster_custom_object("cilium.io", "v2", "ciliumclusterwidenetworkpolicies", "c1")
        assert got["kind"] == "CiliumClusterwideNetworkPolicy" and "namespace" not in got["metadata"]
        rv = every["metadata"]["resourceVersion"]
        server.patch("ciliumnetworkpolicies", "p1", lambda p: p["spec"].update(endpointSelector={}), namespace="x")
        server.delete("ciliumnetworkpolicies", "p2", namespace="y")
        resp = custom.list_cluster_custom_object("cilium.io", "v2", "ciliumnetworkpolicies", watch=True,
                                                 resource_version=rv, timeout_seconds=1, _preload_content=False)
        events = [json.loads(line) for line in resp.read().splitlines() if line]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("MODIFIED", "p1"), ("DELETED", "p2")]
        assert events[0]["object"]["spec"]["endpointSelector"] == {}
        for bad in (lambda: custom.list_cluster_custom_object("cilium.io", "v1", "ciliumnetworkpolicies"),
                    lambda: custom.get_namespaced_custom_object("cilium.io", "v2", "x",
                                                                "ciliumclusterwidenetworkpolicies", "c1")):
            with pytest.raises(client.ApiException) as exc:
                bad()
            assert exc.value.status == 404
