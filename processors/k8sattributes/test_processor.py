"""The processor on flows, with metadata from the stand-in API server: both ends named as
Hubble names them, OTel attributes, precedence, reserved identities, reuse and grace,
bounded caches, telemetry."""
from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import FrozenInstanceError
from typing import Any, Callable

import kubernetes.client.models
import pytest

from flowtel.lib.hubble import convert as hubble, printer, summary as _summary, timefmt
from flowtel.component import Telemetry
from flowtel.records import Endpoint, Flow, LostEvents, MetricKind, MetricPoint, Verdict, Workload, frozen_extensions, replace
from processors.k8sattributes.conftest import wait_until
from processors.k8sattributes.kube_source import KubeSource
from processors.k8sattributes.processor import K8sAttributesProcessor
from tests.kubeapi import FakeApiServer, rfc3339
from tests.kubeapi import objects as o

Make = Callable[..., K8sAttributesProcessor]


def flow(src: str, dst: str, *, t: float | None = None, **kw: Any) -> Flow:
    return Flow(time_ns=int((time.time() if t is None else t) * 1e9), node_name="node-1", verdict=Verdict.FORWARDED,
                ip_version=6 if ":" in src else 4, src_ip=src, dst_ip=dst, protocol=6, src_port=40000, dst_port=80, **kw)


def enrich(p: K8sAttributesProcessor, *flows: Flow) -> list[Flow]:
    out = p.process(list(flows))
    # New records (the inputs are shared and immutable), the same but for the endpoints.
    assert len(out) == len(flows)
    for new, old in zip(out, flows):
        assert isinstance(new, Flow) and replace(new, source=old.source, destination=old.destination) == old
    return out  # type: ignore[return-value]  # every record out is a Flow (checked above)


def ends(p: K8sAttributesProcessor, src: str, dst: str, t: float | None = None) -> tuple[Endpoint, Endpoint]:
    (f,) = enrich(p, flow(src, dst, t=t))
    assert f.source is not None and f.destination is not None
    return f.source, f.destination


def source_of(p: K8sAttributesProcessor) -> KubeSource:
    assert isinstance(p.source, KubeSource)
    return p.source


@pytest.fixture
def shop(api: FakeApiServer) -> FakeApiServer:
    """A small cluster: two nodes, a Deployment, a StatefulSet, a DaemonSet, a CronJob's Job,
    a bare pod, services, and the API server's service and addresses."""
    api.create("namespaces", o.namespace("shop", {"team": "payments"}, annotations={"contact": "pay@example.com"}))
    api.create("namespaces", o.namespace("default"))
    api.create("nodes", o.node("node-1", internal_ip="192.168.0.1", external_ip="203.0.113.1", pod_cidr="10.0.1.0/24"))
    api.create("nodes", o.node("node-2", internal_ip="192.168.0.2", pod_cidr="10.0.2.0/24"))
    api.create("replicasets", o.replicaset("frontend-7c9d6b", "shop", deployment="frontend"))
    api.create("jobs", o.job("report-28843200", "shop", cronjob="report"))
    api.create("pods", o.pod("frontend-7c9d6b-abcde", "shop", ip="10.0.1.5", node="node-1",
                             labels={"app": "frontend", "pod-template-hash": "7c9d6b"},
                             annotations={"owner": "web-team"}, owner=("ReplicaSet", "frontend-7c9d6b"),
                             service_account="frontend"))
    api.create("pods", o.pod("payments-0", "shop", ips=("10.0.2.7", "fd00:2::7"), node="node-2",
                             labels={"app": "payments", "statefulset.kubernetes.io/pod-name": "payments-0",
                                     "controller-revision-hash": "payments-5d8f"},
                             owner=("StatefulSet", "payments")))
    api.create("pods", o.pod("agent-x7k2p", "shop", ip="10.0.1.9", labels={"app": "agent"}, owner=("DaemonSet", "agent")))
    api.create("pods", o.pod("report-28843200-q2w3e", "shop", ip="10.0.2.11", node="node-2", owner=("Job", "report-28843200")))
    api.create("pods", o.pod("debug", "default", ip="10.0.1.77", labels={"run": "debug"}))
    api.create("pods", o.pod("kube-proxy-a", "kube-system", ip="192.168.0.1", node="node-1", host_network=True))
    api.create("pods", o.pod("kube-proxy-b", "kube-system", ip="192.168.0.2", node="node-2", host_network=True))
    api.create("pods", o.pod("node-exporter-b", "kube-system", ip="192.168.0.2", node="node-2", host_network=True))
    api.create("services", o.service("kubernetes", "default", cluster_ip="10.96.0.1"))
    api.create("services", o.service("payments", "shop", cluster_ip="10.96.0.20", cluster_ips=("10.96.0.20", "fd00:96::20")))
    api.create("endpointslices", o.endpointslice(addresses=("192.168.0.2", "198.51.100.10")))
    return api


def test_both_ends_named_as_hubble_and_otel(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor(extract={
        "labels": [{"key": "app"}, {"key": "team", "from": "namespace"}],
        "annotations": [{"key": "owner", "tag_name": "service.owner"}],
    })
    src, dst = ends(p, "10.0.1.5", "10.0.2.7")
    body = hubble.flow_json(flow("10.0.1.5", "10.0.2.7", source=src, destination=dst))
    assert body["source"] == {
        "identity": src.identity,
        "namespace": "shop",
        "labels": [
            "k8s:app=frontend",
            "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop",
            "k8s:io.cilium.k8s.namespace.labels.team=payments",
            "k8s:io.cilium.k8s.policy.cluster=default",
            "k8s:io.cilium.k8s.policy.serviceaccount=frontend",
            "k8s:io.kubernetes.pod.namespace=shop",
        ],
        "pod_name": "frontend-7c9d6b-abcde",
        "workloads": [{"name": "frontend", "kind": "Deployment"}],
        "cluster_name": "default",
    }
    assert 256 <= src.identity <= 65535
    uid = shop.get("pods", "frontend-7c9d6b-abcde", "shop")["metadata"]["uid"]
    assert src.attributes == {
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "frontend-7c9d6b-abcde",
        "k8s.pod.uid": uid,
        "k8s.node.name": "node-1",
        "k8s.deployment.name": "frontend",
        "k8s.replicaset.name": "frontend-7c9d6b",
        "k8s.pod.labels.app": "frontend",
        "k8s.namespace.labels.team": "payments",
        "service.owner": "web-team",
    }
    assert dst.pod_name == "payments-0" and list(dst.workloads) == [Workload("payments", "StatefulSet")]
    assert not any("statefulset.kubernetes.io" in lbl or "controller-revision-hash" in lbl for lbl in dst.labels)
    assert dst.attributes["k8s.statefulset.name"] == "payments" and dst.attributes["k8s.node.name"] == "node-2"
    # The compact line names both ends by namespace/pod.
    line = printer.compact_line(flow("10.0.1.5", "10.0.2.7", source=src, destination=dst))
    assert "shop/frontend-7c9d6b-abcde:40000" in line and "shop/payments-0:80" in line


def test_workload_kinds(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor()
    _, ds = ends(p, "8.8.8.8", "10.0.1.9")
    _, cron = ends(p, "8.8.8.8", "10.0.2.11")
    _, bare = ends(p, "8.8.8.8", "10.0.1.77")
    _, v6 = ends(p, "fd00:1::1", "fd00:2::7")
    assert list(ds.workloads) == [Workload("agent", "DaemonSet")] and ds.attributes["k8s.daemonset.name"] == "agent"
    assert list(cron.workloads) == [Workload("report", "CronJob")]
    assert cron.attributes["k8s.cronjob.name"] == "report" and cron.attributes["k8s.job.name"] == "report-28843200"
    assert bare.pod_name == "debug" and list(bare.workloads) == []  # a bare pod has no workload, as in Hubble
    assert v6.pod_name == "payments-0"  # every podIP, IPv6 too


def test_owner_watches_off_resolve_from_names(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor(watch_replicasets=False, watch_jobs=False)
    assert "replicasets" not in source_of(p).informers and "jobs" not in source_of(p).informers
    assert not [r for r in shop.requests if "replicasets" in r.path or "jobs" in r.path]
    src, dst = ends(p, "10.0.1.5", "10.0.2.11")
    assert list(src.workloads) == [Workload("frontend", "Deployment")]
    assert list(dst.workloads) == [Workload("report", "CronJob")]


def test_replicaset_watch_follows_owner_changes(shop: FakeApiServer, make_processor: Make) -> None:
    # A ReplicaSet whose name does not follow the Deployment's: only the watch can tell.
    shop.create("replicasets", o.replicaset("canary-rs", "shop", deployment="checkout"))
    shop.create("pods", o.pod("canary-rs-1", "shop", ip="10.0.1.40", labels={"pod-template-hash": "zz"},
                              owner=("ReplicaSet", "canary-rs")))
    p = make_processor()
    assert list(ends(p, "10.0.1.40", "8.8.8.8")[0].workloads) == [Workload("checkout", "Deployment")]
    shop.patch("replicasets", "canary-rs", lambda rs: rs["metadata"]["ownerReferences"][0].update(name="checkout-v2"), "shop")
    wait_until(lambda: list(ends(p, "10.0.1.40", "8.8.8.8")[0].workloads) == [Workload("checkout-v2", "Deployment")],
               what="the new owner")


def test_precedence_pod_then_service_then_node(shop: FakeApiServer, make_processor: Make) -> None:
    # One address claimed by everything: a pod wins, then a ClusterIP, then a node.
    shop.create("nodes", o.node("node-3", internal_ip="10.0.9.9"))
    shop.create("services", o.service("clash", "shop", cluster_ip="10.0.9.9"))
    p = make_processor()
    assert ends(p, "10.0.9.9", "8.8.8.8")[0].attributes.get("k8s.service.name") == "clash"
    shop.create("pods", o.pod("clash-pod", "shop", ip="10.0.9.9"))
    wait_until(lambda: ends(p, "10.0.9.9", "8.8.8.8")[0].pod_name == "clash-pod", what="the pod taking over")
    shop.delete("services", "clash", "shop")
    shop.delete("pods", "clash-pod", "shop")
    p2 = make_processor(deleted_pod_grace=0)
    wait_until(lambda: list(ends(p2, "10.0.9.9", "8.8.8.8")[0].labels) == ["reserved:remote-node"], what="the node")


def test_service_cluster_ip(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor()
    _, svc = ends(p, "10.0.1.5", "10.96.0.20")
    _, svc6 = ends(p, "fd00:1::5", "fd00:96::20")
    assert svc.namespace == "shop" and svc.pod_name == "" and svc.identity == 0
    assert svc.attributes == {"k8s.namespace.name": "shop", "k8s.service.name": "payments"}
    assert svc6.attributes["k8s.service.name"] == "payments"


def test_host_network_pods_resolve_to_their_node(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor()
    host, remote = ends(p, "192.168.0.1", "192.168.0.2")
    # 192.168.0.2 is node-2 (and the API server): never kube-proxy-b or node-exporter-b.
    assert host.pod_name == "" and host.identity == 1 and list(host.labels) == ["reserved:host"]
    assert host.attributes == {"k8s.node.name": "node-1"}
    assert remote.pod_name == "" and remote.identity == 7
    assert list(remote.labels) == ["reserved:kube-apiserver", "reserved:remote-node"]
    assert ends(p, "203.0.113.1", "8.8.8.8")[0].identity == 1  # any address of this node is the host


def test_reserved_identities(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor()
    src, world = ends(p, "10.0.1.5", "1.1.1.1")
    assert world.identity == 2 and list(world.labels) == ["reserved:world"] and world.attributes == {}
    _, api_svc = ends(p, "10.0.1.5", "10.96.0.1")
    assert api_svc.identity == 7 and list(api_svc.labels) == ["reserved:kube-apiserver"]
    assert api_svc.attributes["k8s.service.name"] == "kubernetes"
    _, api_ep = ends(p, "10.0.1.5", "198.51.100.10")
    assert api_ep.identity == 7 and list(api_ep.labels) == ["reserved:kube-apiserver"]
    # The API server's addresses are watched: a new one is kube-apiserver, a removed one world.
    shop.patch("endpointslices", "kubernetes", lambda s: s.update(endpoints=[{"addresses": ["198.51.100.11"]}]))
    wait_until(lambda: ends(p, "10.0.1.5", "198.51.100.11")[1].identity == 7, what="the new API address")
    assert ends(p, "10.0.1.5", "198.51.100.10")[1].identity == 2
    _, remote = ends(p, "10.0.1.5", "192.168.0.2")
    assert remote.identity == 6 and list(remote.labels) == ["reserved:remote-node"]
    # In another node's pod CIDR but no pod: not world, unknown, with the node that owns it.
    _, unknown = ends(p, "10.0.1.5", "10.0.2.200")
    assert unknown.identity == 0 and list(unknown.labels) == [] and unknown.attributes == {"k8s.node.name": "node-2"}
    assert printer.compact_line(flow("10.0.1.5", "1.1.1.1", source=src, destination=world)).count("(world)") == 1


def test_ip_reuse_and_deleted_pod_grace(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor(deleted_pod_grace="2s")
    before = time.time()
    assert ends(p, "10.0.1.77", "8.8.8.8")[0].pod_name == "debug"
    shop.delete("pods", "debug", "default")
    wait_until(lambda: source_of(p).gauges()["deleted_pods_cached"] == 1, what="the deletion")
    deleted_at = time.time()
    assert ends(p, "10.0.1.77", "8.8.8.8")[0].pod_name == "debug"  # within grace
    assert ends(p, "10.0.1.77", "8.8.8.8", t=deleted_at + 2.5)[0].pod_name == ""  # a record after grace
    # A newer pod reuses the address at once: new records are the new pod, late ones the old.
    shop.create("pods", o.pod("debug-2", "default", ip="10.0.1.77"))
    wait_until(lambda: ends(p, "10.0.1.77", "8.8.8.8")[0].pod_name == "debug-2", what="the new pod")
    assert ends(p, "10.0.1.77", "8.8.8.8", t=before)[0].pod_name == "debug"
    # In one batch too (the processor reuses an address's answer only within its span):
    # records alternate between the old pod's time and the new one's, each named by its own.
    mixed = [flow("10.0.1.77", "8.8.8.8", t=before if i % 2 else None) for i in range(6)]
    names = [f.source.pod_name for f in enrich(p, *mixed) if f.source is not None]
    assert names == ["debug-2", "debug"] * 3
    # After the grace, the deleted pod leaves every cache.
    uid = next(u for u, pod in source_of(p)._pods.pods.items() if pod.name == "debug")
    wait_until(lambda: uid not in source_of(p)._pods.pods, timeout=5, what="the grace to end")
    g = source_of(p).gauges()
    assert g["deleted_pods_cached"] == 0 and uid not in source_of(p)._views
    assert ends(p, "10.0.1.77", "8.8.8.8", t=before)[0].pod_name == "debug-2"


def test_same_name_recreated_with_a_new_uid(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor(deleted_pod_grace="30s")
    old_uid = ends(p, "10.0.2.7", "8.8.8.8")[0].attributes["k8s.pod.uid"]
    shop.delete("pods", "payments-0", "shop")
    shop.create("pods", o.pod("payments-0", "shop", ip="10.0.2.8", node="node-2", owner=("StatefulSet", "payments")))
    wait_until(lambda: ends(p, "10.0.2.8", "8.8.8.8")[0].pod_name == "payments-0", what="the new payments-0")
    new_uid = ends(p, "10.0.2.8", "8.8.8.8")[0].attributes["k8s.pod.uid"]
    assert new_uid != old_uid
    assert ends(p, "10.0.2.7", "8.8.8.8")[0].attributes["k8s.pod.uid"] == old_uid  # old address: old pod, in grace


def test_namespace_label_change_updates_labels(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor()
    assert "k8s:io.cilium.k8s.namespace.labels.team=payments" in ends(p, "10.0.1.5", "8.8.8.8")[0].labels
    shop.patch("namespaces", "shop", lambda ns: ns["metadata"]["labels"].update(team="checkout"))
    wait_until(lambda: "k8s:io.cilium.k8s.namespace.labels.team=checkout" in ends(p, "10.0.1.5", "8.8.8.8")[0].labels,
               what="the new namespace label")


def test_metadata_selection(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor(extract={"metadata": ["k8s.pod.name", "k8s.cluster.name"]}, cluster_name="prod-east")
    src, _ = ends(p, "10.0.1.5", "8.8.8.8")
    assert src.attributes == {"k8s.pod.name": "frontend-7c9d6b-abcde", "k8s.cluster.name": "prod-east"}
    assert src.cluster_name == "prod-east" and "k8s:io.cilium.k8s.policy.cluster=prod-east" in src.labels


def test_other_records_pass_untouched_and_existing_endpoints_are_filled(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor()
    lost = LostEvents(1, "FLOW_MAP_FULL", 3)
    point = MetricPoint("m", 1.0, MetricKind.SUM, 1)
    arp = replace(flow("", ""), ip_version=0, ethertype=0x0806)
    given = flow("10.0.1.5", "8.8.8.8", source=Endpoint(attributes=frozen_extensions({"custom": "kept"})))
    out = p.process([lost, point, arp, given])
    assert out[:3] == [lost, point, arp] and all(a is b for a, b in zip(out[:3], [lost, point, arp]))
    assert given.source is not None and given.source.pod_name == ""  # the input record is unchanged
    named = out[3]
    assert isinstance(named, Flow) and named.source is not None and named.source.pod_name == "frontend-7c9d6b-abcde"
    assert named.source.attributes["custom"] == "kept" and named.source.attributes["k8s.pod.name"] == "frontend-7c9d6b-abcde"
    # Records share their cached endpoint, which nobody can change.
    a, _ = ends(p, "10.0.1.5", "8.8.8.8")
    b, _ = ends(p, "10.0.1.5", "8.8.8.8")
    assert a is b
    with pytest.raises(FrozenInstanceError):
        a.labels = ()  # type: ignore[misc]  # the point: refused
    with pytest.raises(TypeError):
        a.attributes["mutated"] = "yes"  # type: ignore[index]  # the point: refused


def test_cached_objects_are_small_dataclasses(shop: FakeApiServer, make_processor: Make) -> None:
    for i in range(50):
        shop.create("pods", o.pod(f"bulk-{i}", "shop", ip=f"10.0.1.{100 + i}", labels={"app": "bulk"},
                                  annotations={"big": "x" * 4000}, owner=("ReplicaSet", "frontend-7c9d6b")))
    p = make_processor()
    src = source_of(p)
    cached: list[Any] = []
    for informer in src.informers.values():
        cached.extend(informer.store.values())
    cached.extend(src._pods.pods.values())
    assert len(cached) > 50
    for obj in cached:
        assert not isinstance(obj, dict)
        assert type(obj).__module__ == "processors.k8sattributes.internal.kube.objects"
        assert not hasattr(obj, "__dict__"), type(obj)  # slotted
    # Nothing the client would have built (models of pods, metadata, …) is alive.
    gc.collect()
    models = tuple(c for c in vars(kubernetes.client.models).values() if isinstance(c, type))
    assert not [x for x in gc.get_objects() if isinstance(x, models)]
    # Size per pod (what replicas share, such as interned labels, counted once): the 4 kB
    # annotation, spec, status and managedFields are not kept.
    raw = len(json.dumps(shop.get("pods", "bulk-0", "shop")))
    seen: set[int] = set()
    per_pod = sum(_deep_size(src.informers["pods"].store[f"shop/bulk-{i}"], seen) for i in range(50)) / 50
    assert per_pod < 700 and per_pod < raw / 8, (per_pod, raw)


def _deep_size(obj: Any, seen: set[int] | None = None) -> int:
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, (tuple, list, set, frozenset)):
        size += sum(_deep_size(x, seen) for x in obj)
    elif isinstance(obj, dict):
        size += sum(_deep_size(k, seen) + _deep_size(v, seen) for k, v in obj.items())
    elif hasattr(obj, "__slots__"):
        size += sum(_deep_size(getattr(obj, s), seen) for s in obj.__slots__ if hasattr(obj, s))
    return size


def test_telemetry(shop: FakeApiServer, make_processor: Make) -> None:
    telemetry = Telemetry()
    p = make_processor(telemetry=telemetry)
    enrich(p, flow("10.0.1.5", "10.0.2.7"), flow("10.0.1.5", "10.96.0.20"), flow("192.168.0.1", "1.1.1.1"))
    snap = telemetry.snapshot()
    k = "k8sattributes"
    assert snap[(k, "resolved_pod")] == 3 and snap[(k, "resolved_service")] == 1
    assert snap[(k, "resolved_node")] == 1 and snap[(k, "resolved_world")] == 1
    assert snap[(k, "pods_cached")] == 5 and snap[(k, "pod_ips_cached")] == 6
    assert snap[(k, "services_cached")] == 2 and snap[(k, "nodes_cached")] == 2 and snap[(k, "namespaces_cached")] == 2
    assert snap[(k, "replicasets_cached")] == 1 and snap[(k, "jobs_cached")] == 1
    assert snap[(k, "owner_cache_size")] == 2 and snap[(k, "endpoint_views_cached")] == 2
    assert snap[(k, "deleted_pods_cached")] == 0
    for counter in ("watch_restarts", "relists", "api_errors"):
        assert telemetry.get(k, counter) == 0


def test_pipelines_share_one_connection(shop: FakeApiServer, make_processor: Make) -> None:
    telemetry = Telemetry()
    a = make_processor(telemetry=telemetry)
    b = make_processor(telemetry=telemetry)
    assert a.source is b.source
    shop.wait_for_watch("pods")
    time.sleep(0.1)
    assert shop.watch_count("pods") == 1
    a.shutdown()
    assert ends(b, "10.0.1.5", "8.8.8.8")[0].pod_name == "frontend-7c9d6b-abcde"


def test_pod_created_with_a_past_timestamp_and_completed_job(shop: FakeApiServer, make_processor: Make) -> None:
    p = make_processor(deleted_pod_grace="500ms")
    shop.create("pods", o.pod("batch-1", "shop", ip="10.0.1.200", created=rfc3339(time.time() - 3600)))
    wait_until(lambda: ends(p, "10.0.1.200", "8.8.8.8")[0].pod_name == "batch-1", what="the batch pod")
    shop.patch("pods", "batch-1", lambda pod: pod["status"].update(phase="Succeeded"), "shop")
    # A completed pod's address is released: named during the grace, then not.
    wait_until(lambda: ends(p, "10.0.1.200", "8.8.8.8")[0].pod_name == "", timeout=5, what="the grace after completion")
    assert ends(p, "10.0.1.200", "8.8.8.8")[0].attributes == {"k8s.node.name": "node-1"}
