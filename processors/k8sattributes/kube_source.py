"""Metadata from the Kubernetes API: informers keep indexes current, lookups read them.

Everything a lookup touches is a dict that informer threads keep current: the pod
association (IP → pod as of a time), ClusterIPs, node addresses, the API server's
addresses, and node pod CIDRs. Pod views are built on first use and kept until the pod or
its namespace/owner changes (a generation counter), so the pipeline thread does one or two
dict hits per address and never waits for the network.

Precedence for an address: a pod, else a service ClusterIP, else a node (this node:
``reserved:host``; another: ``reserved:remote-node``), else one of the API server's
addresses (``reserved:kube-apiserver``), else a pod CIDR of a node with no pod known there,
else ``reserved:world``.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Callable

from flowtel.component import Telemetry
from flowtel.errors import StartError
from processors.k8sattributes.addresses import PrefixTable
from processors.k8sattributes.config import K8sAttributesConfig
from processors.k8sattributes.extract import Extractor
from flowtel.lib.kube import client as kube_client
from flowtel.lib.kube.health import ApiHealth, rbac_remedy
from flowtel.lib.kube.informer import Informer, WatchOptions, wait_synced
from processors.k8sattributes.access import kube_access
from processors.k8sattributes.internal.kube.listers import listers
from processors.k8sattributes.internal.kube.objects import (
    KUBERNETES_SERVICE,
    EndpointSliceMeta,
    JobMeta,
    NamespaceMeta,
    NodeMeta,
    PodMeta,
    ReplicaSetMeta,
    ServiceMeta,
    strip_endpointslice,
    strip_job,
    strip_namespace,
    strip_node,
    strip_pod,
    strip_replicaset,
    strip_service,
)
from processors.k8sattributes.metadata import WORLD, EndpointView, ViewBuilder, fallback
from processors.k8sattributes.pod_association import PodAssociation
from processors.k8sattributes.workload import OwnerResolver

log = logging.getLogger("flowtel.processor.k8sattributes")
# What the processor does while the API server fails.
MEANWHILE = "Records keep flowing with what is already known (addresses not yet known are reserved:world)"

KUBERNETES_SLICES = "kubernetes.io/service-name=kubernetes"


class KubeSource:
    def __init__(
        self,
        component: str,
        config: K8sAttributesConfig,
        *,
        node_name: str,
        telemetry: Telemetry,
        builder: ViewBuilder,
        on_health: Callable[[str | None], None] | None = None,
    ) -> None:
        self.component = component
        self._on_health = on_health
        self.config = config
        self.node_name = node_name
        self._telemetry = telemetry
        self._builder = builder
        self._extractor: Extractor = builder.extractor
        self._generation = 0  # bumped when a namespace or an owner changes: pod views are stale
        self._views: dict[str, tuple[int, PodMeta, EndpointView]] = {}
        self._pods = PodAssociation(config.deleted_pod_grace, on_forget=self._forget_view)
        self._service_views: dict[str, EndpointView] = {}
        self._service_of_ip: dict[str, str] = {}
        self._node_of_ip: dict[str, str] = {}
        self._nodes: dict[str, NodeMeta] = {}
        self._address_views: dict[str, EndpointView] = {}
        self._apiserver_slices: dict[str, tuple[str, ...]] = {}
        self._apiserver_ips: frozenset[str] = frozenset()
        self._pod_cidrs: PrefixTable[EndpointView] = PrefixTable()
        self._write_lock = threading.Lock()  # informer threads update the shared indexes
        self._informers: dict[str, Informer[Any]] = {}
        self._owners = OwnerResolver(
            replicasets=(lambda: self._store("replicasets")) if config.watch_replicasets else None,
            jobs=(lambda: self._store("jobs")) if config.watch_jobs else None,
            cache_size=config.owner_cache.size,
            cache_ttl=config.owner_cache.ttl,
        )
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        self._api: Any = None
        self.health: ApiHealth | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        if cfg.mode == "node" and not self.node_name:
            raise StartError(self.component, "mode node needs this node's name, and it is empty",
                             "set NODE_NAME from the Downward API (fieldRef spec.nodeName) in the DaemonSet")
        access = kube_access(cfg, self.component)
        assert access is not None  # a kubernetes source has an auth_type (config validation)
        # One pooled connection per informer (each holds a watch open), and room for relists.
        self._api = kube_client.connect(access, pool_size=12)
        server = kube_client.server_of(self._api)
        self.health = ApiHealth(self.component, server, self._on_health, meanwhile=MEANWHILE,
                                rbac_remedy=rbac_remedy(access), logger=log)
        calls = listers(self._api)
        options = WatchOptions(
            request_timeout=cfg.request_timeout,
            watch_timeout=cfg.watch_timeout,
            page_size=cfg.page_size,
            backoff_initial=cfg.backoff.initial_interval,
            backoff_max=cfg.backoff.max_interval,
        )
        keep_pod_annotation = functools.partial(self._extractor.keeps, "pod", "annotations")
        keep_ns_annotation = functools.partial(self._extractor.keeps, "namespace", "annotations")
        specs: list[tuple[str, Callable[..., Any], Any, dict[str, str]]] = [
            # Informers sync in any order: pod views are built on first use and rebuilt when
            # a namespace or owner event invalidates them.
            ("namespaces", functools.partial(strip_namespace, keep_annotation=keep_ns_annotation), _NamespaceHandler(self), {}),
            ("nodes", strip_node, _NodeHandler(self), {}),
            ("endpointslices", strip_endpointslice, _ApiserverHandler(self), {"label_selector": KUBERNETES_SLICES}),
            ("services", strip_service, _ServiceHandler(self), {}),
        ]
        if cfg.watch_replicasets:
            specs.append(("replicasets", strip_replicaset, _OwnerHandler(self, "ReplicaSet"), {}))
        if cfg.watch_jobs:
            specs.append(("jobs", strip_job, _OwnerHandler(self, "Job"), {}))
        pod_filter = {"field_selector": f"spec.nodeName={self.node_name}"} if cfg.mode == "node" else {}
        specs.append(("pods", functools.partial(strip_pod, keep_annotation=keep_pod_annotation), _PodHandler(self), pod_filter))
        for name, strip, handler, kwargs in specs:
            self._informers[name] = Informer(
                name, calls[name], strip, handler, options, health=self.health, count=self._count, list_kwargs=kwargs)
        for informer in self._informers.values():
            informer.start()
        self._janitor = threading.Thread(target=self._janitor_loop, name="flowtel-k8s-janitor", daemon=True)
        self._janitor.start()
        where = f"pods on node {self.node_name}" if cfg.mode == "node" else "all pods"
        if wait_synced(list(self._informers.values()), cfg.initial_sync_timeout):
            log.info("%s: synced with %s (%s): %d pods, %d services, %d nodes", self.component, server, where,
                     len(self._store("pods")), len(self._store("services")), len(self._store("nodes")))
        else:
            missing = [n for n, i in self._informers.items() if not i.synced.is_set()]
            log.warning("%s: not synced with %s within %gs (still waiting for %s); starting anyway, records are "
                        "named as the caches fill", self.component, server, cfg.initial_sync_timeout, ", ".join(missing))

    def shutdown(self) -> None:
        self._stop.set()
        for informer in self._informers.values():
            informer.request_stop()  # all at once: each may be blocked in a read
        for informer in self._informers.values():
            informer.join()
        if self._janitor is not None:
            self._janitor.join(5)
        if self._api is not None:
            self._api.close()
            self._api = None

    @property
    def informers(self) -> dict[str, Informer[Any]]:
        return self._informers

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self._informers.values())

    # --- the hot path ---------------------------------------------------------------------

    def lookup(self, ip: str, when: float) -> EndpointView:
        return self.lookup_span(ip, when)[0]

    def lookup_span(self, ip: str, when: float) -> tuple[EndpointView, float, float]:
        pod, lo, hi = self._pods.span(ip, when)
        if pod is not None:
            entry = self._views.get(pod.uid)
            if entry is not None and entry[1] is pod and entry[0] == self._generation:
                return entry[2], lo, hi
            return self._pod_view(pod), lo, hi
        # No pod holds the address (at ``when``, or ever: then the answer below holds for any time).
        return self._other_view(ip), lo, hi

    def _other_view(self, ip: str) -> EndpointView:
        view = self._service_views.get(ip)
        if view is not None:
            return view
        view = self._address_views.get(ip)
        if view is not None:
            return view
        if ip in self._node_of_ip or ip in self._apiserver_ips:
            return self._address_view(ip)
        view = self._pod_cidrs.lookup(ip)
        return view if view is not None else fallback(ip)

    def _pod_view(self, pod: PodMeta) -> EndpointView:
        generation = self._generation
        ns: NamespaceMeta | None = self._store("namespaces").get(pod.namespace)
        view = self._builder.pod(pod, self._owners.chain(pod), ns.labels if ns else (), ns.annotations if ns else ())
        self._views[pod.uid] = (generation, pod, view)
        return view

    def _address_view(self, ip: str) -> EndpointView:
        node = self._node_of_ip.get(ip)
        api = ip in self._apiserver_ips
        if node is not None:
            view = self._builder.node(node, host=node == self.node_name, kube_apiserver=api)
        elif api:
            view = self._builder.kube_apiserver()
        else:
            return WORLD  # changed under us; the next lookup sees the new state
        self._address_views[ip] = view
        return view

    # --- indexes (informer threads) -------------------------------------------------------

    def _store(self, name: str) -> dict[str, Any]:
        informer = self._informers.get(name)
        return informer.store if informer is not None else {}

    def _count(self, name: str, value: int) -> None:
        self._telemetry.add(self.component, name, value)

    def _invalidate_views(self) -> None:
        self._generation += 1

    def _forget_view(self, uid: str) -> None:
        self._views.pop(uid, None)

    def _set_service(self, svc: ServiceMeta | None, old: ServiceMeta | None) -> None:
        with self._write_lock:
            if old is not None:
                for ip in old.cluster_ips:
                    if self._service_of_ip.get(ip) == old.key:
                        del self._service_of_ip[ip]
                        self._service_views.pop(ip, None)
            if svc is not None:
                is_api = (svc.namespace, svc.name) == KUBERNETES_SERVICE
                view = self._builder.service(svc.namespace, svc.name, kube_apiserver=is_api)
                for ip in svc.cluster_ips:
                    self._service_of_ip[ip] = svc.key
                    self._service_views[ip] = view

    def _set_node(self, node: NodeMeta | None, old: NodeMeta | None) -> None:
        with self._write_lock:
            if old is not None:
                self._nodes.pop(old.name, None)
                for ip in (*old.internal_ips, *old.external_ips):
                    if self._node_of_ip.get(ip) == old.name:
                        del self._node_of_ip[ip]
                for cidr in old.pod_cidrs:
                    self._pod_cidrs.remove(cidr)
            if node is not None:
                self._nodes[node.name] = node
                # This node is the host on every address it has; other nodes are
                # remote-node on their internal addresses, as Cilium's node IPs.
                ips = (*node.internal_ips, *node.external_ips) if node.name == self.node_name else node.internal_ips
                for ip in ips:
                    self._node_of_ip[ip] = node.name
                unknown = self._builder.unknown_pod_address(node.name)
                for cidr in node.pod_cidrs:
                    self._pod_cidrs.add(cidr, unknown)
            self._address_views = {}

    def _set_apiserver(self, key: str, addresses: tuple[str, ...] | None) -> None:
        with self._write_lock:
            if addresses is None:
                self._apiserver_slices.pop(key, None)
            else:
                self._apiserver_slices[key] = addresses
            self._apiserver_ips = frozenset(ip for ips in self._apiserver_slices.values() for ip in ips)
            self._address_views = {}

    # --- janitor --------------------------------------------------------------------------

    def _janitor_loop(self) -> None:
        interval = min(5.0, max(0.05, self.config.deleted_pod_grace / 4))
        while not self._stop.wait(interval):
            self.expire(time.time())

    def expire(self, now: float) -> None:
        """Drop deleted pods whose grace is over, and views of pods no longer known."""
        self._pods.expire(now)
        if len(self._views) > len(self._pods.pods):
            pods = self._pods.pods
            for uid in [u for u in list(self._views) if u not in pods]:
                self._views.pop(uid, None)

    # --- sizes (telemetry gauges) ---------------------------------------------------------

    def gauges(self) -> dict[str, float]:
        deleted = self._pods.deleted_count
        return {
            "pods_cached": len(self._pods.pods) - deleted,
            "deleted_pods_cached": deleted,
            "pod_ips_cached": len(self._pods.by_ip),
            "services_cached": len(self._store("services")),
            "nodes_cached": len(self._nodes),
            "namespaces_cached": len(self._store("namespaces")),
            "replicasets_cached": len(self._store("replicasets")),
            "jobs_cached": len(self._store("jobs")),
            "owner_cache_size": len(self._owners),
            "endpoint_views_cached": len(self._views),
        }


class _PodHandler:
    def __init__(self, source: KubeSource) -> None:
        self._pods = source._pods

    def on_add(self, obj: PodMeta) -> None:
        self._pods.upsert(obj, time.time())

    def on_update(self, old: PodMeta, new: PodMeta) -> None:
        now = time.time()
        if old.uid != new.uid:  # deleted and re-created under the same name while unwatched
            self._pods.remove(old, now)
        self._pods.upsert(new, now)

    def on_delete(self, obj: PodMeta) -> None:
        self._pods.remove(obj, time.time())


class _ServiceHandler:
    def __init__(self, source: KubeSource) -> None:
        self._source = source

    def on_add(self, obj: ServiceMeta) -> None:
        self._source._set_service(obj, None)

    def on_update(self, old: ServiceMeta, new: ServiceMeta) -> None:
        self._source._set_service(new, old)

    def on_delete(self, obj: ServiceMeta) -> None:
        self._source._set_service(None, obj)


class _NodeHandler:
    def __init__(self, source: KubeSource) -> None:
        self._source = source

    def on_add(self, obj: NodeMeta) -> None:
        self._source._set_node(obj, None)

    def on_update(self, old: NodeMeta, new: NodeMeta) -> None:
        self._source._set_node(new, old)

    def on_delete(self, obj: NodeMeta) -> None:
        self._source._set_node(None, obj)


class _NamespaceHandler:
    def __init__(self, source: KubeSource) -> None:
        self._source = source

    def on_add(self, obj: NamespaceMeta) -> None:
        self._source._invalidate_views()

    def on_update(self, old: NamespaceMeta, new: NamespaceMeta) -> None:
        self._source._invalidate_views()

    def on_delete(self, obj: NamespaceMeta) -> None:
        self._source._invalidate_views()


class _OwnerHandler:
    """ReplicaSets or Jobs: a changed owner invalidates its cached resolution and pod views."""

    def __init__(self, source: KubeSource, kind: str) -> None:
        self._source = source
        self._kind = kind

    def _changed(self, obj: ReplicaSetMeta | JobMeta) -> None:
        self._source._owners.invalidate(obj.namespace, self._kind, obj.name)
        self._source._invalidate_views()

    def on_add(self, obj: ReplicaSetMeta | JobMeta) -> None:
        self._changed(obj)

    def on_update(self, old: ReplicaSetMeta | JobMeta, new: ReplicaSetMeta | JobMeta) -> None:
        self._changed(new)

    def on_delete(self, obj: ReplicaSetMeta | JobMeta) -> None:
        # Pods of a deleted ReplicaSet keep the name they had (the cache entry expires).
        self._source._owners.invalidate(obj.namespace, self._kind, obj.name)


class _ApiserverHandler:
    def __init__(self, source: KubeSource) -> None:
        self._source = source

    def on_add(self, obj: EndpointSliceMeta) -> None:
        self._source._set_apiserver(obj.key, obj.addresses)

    def on_update(self, old: EndpointSliceMeta, new: EndpointSliceMeta) -> None:
        self._source._set_apiserver(new.key, new.addresses)

    def on_delete(self, obj: EndpointSliceMeta) -> None:
        self._source._set_apiserver(obj.key, None)
