"""Pods, namespaces and Cilium policies from the Kubernetes API, for the DNS proxy.

Four informers (the k8sattributes processor's list/watch loop: resourceVersion, bookmarks,
reconnect with backoff, relist on 410 Gone) keep their stores current:

- ``pods`` of every node: the proxy polices the pods whose ``spec.nodeName`` is this node
  (``$NODE_NAME``), and every pod of the cluster may be a ``toEndpoints`` destination, as
  Cilium resolves those selectors against every identity. Each pod is kept as a few shared
  references (name, namespace, node, addresses, a label set shared by replicas), and fed one
  at a time into a :class:`~flowtel.lib.policy.EndpointIndex`, so a peer's change costs its own
  identity's update, not a rebuild;
- ``namespaces``: their labels become the pod's ``io.cilium.k8s.namespace.labels.<key>``
  labels, as Cilium gives them to endpoints, so selectors on namespace labels work (for
  peers too);
- ``ciliumnetworkpolicies`` and ``ciliumclusterwidenetworkpolicies`` (``cilium.io/v2``), each
  object parsed by :func:`flowtel.lib.policy.parse_policy`, the same parser files go through.
  An object that does not parse stays in the store as an error naming it
  (``CiliumNetworkPolicy ns/name``), so it is reported, counted and replaced by its next
  version; the other policies keep applying.

A change of a policy, a namespace or a pod of this node bumps :attr:`KubeSource.version`
and calls ``on_change``, which wakes the proxy's loop: a watch event reaches the datapath
within one loop round (milliseconds), not a polling interval. A peer's change calls
``on_change`` only when it moved an address a selector in use selects (the index's
version): in a large cluster most pod events concern nobody here. When the API server is
unreachable the stores keep their last state, so the proxy keeps enforcing it; errors are
logged once (then at most once a minute) and counted, and the informers resume from their
resourceVersion when the server returns.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, TypeVar

from cachetools import LRUCache
from kubernetes import client as k8s

from flowtel.lib.policy import (KINDS, EndpointIndex, Labels, Policy, PolicyError, Pod, Service, cilium_labels,
                                parse_policy, service_from_spec)
from flowtel.errors import StartError
from processors.k8sattributes.internal.kube import client as kube_client
from processors.k8sattributes.internal.kube.health import ApiHealth
from processors.k8sattributes.internal.kube.informer import Informer, Keyed, WatchOptions

log = logging.getLogger("flowtel.dnsproxy")

COMPONENT = "dnsproxy"
CILIUM_GROUP = "cilium.io"
CILIUM_VERSION = "v2"
RBAC_REMEDY = (
    "grant the proxy's ServiceAccount list/watch on pods, namespaces and services, and on "
    "ciliumnetworkpolicies and ciliumclusterwidenetworkpolicies (cilium.io) "
    "(deploy/base/dnsproxy/rbac.yaml); check with "
    "`kubectl auth can-i watch ciliumnetworkpolicies.cilium.io --all-namespaces --as=system:serviceaccount:NS:NAME`"
)
MEANWHILE = "The proxy keeps enforcing the pods and policies it already knows"
COUNTERS = ("api_errors", "relists", "watch_restarts", "watch_events", "watch_bookmarks")


# -- objects as the proxy keeps them -------------------------------------------------------

_intern = sys.intern


class _Shared:
    """Equal label sets stored once, as sys.intern does for strings: every replica of a
    workload has the same labels. Bounded: a set pushed out is only stored twice, never wrong."""

    def __init__(self, size: int) -> None:
        self._values: LRUCache[Labels, Labels] = LRUCache(maxsize=size)
        self._lock = threading.Lock()  # informer threads strip concurrently

    def __call__(self, value: Labels) -> Labels:
        with self._lock:
            return self._values.setdefault(value, value)  # type: ignore[no-any-return]


_share = _Shared(65536)


def _labels(raw: Any) -> Labels:
    return _share(tuple(sorted((_intern(str(k)), _intern(str(v))) for k, v in (raw or {}).items())))


@dataclass(frozen=True, slots=True)
class PodObject:
    """A pod as the proxy keeps it (every node's): a handful of references, mostly shared."""

    name: str
    namespace: str
    node: str
    labels: Labels
    ips: tuple[str, ...]
    service_account: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class NamespaceObject:
    name: str
    labels: Labels

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class PolicyObject:
    """One policy object: parsed, or the reason it was rejected (exactly one is set)."""

    key: str
    ref: str  # "CiliumNetworkPolicy ns/name", how messages name it
    policy: Policy | None
    error: str | None


def strip_pod(raw: Mapping[str, Any]) -> PodObject | None:
    """The pod as policy sees it; None for pods that have no address of their own.

    A hostNetwork pod's address is the node's: policing it would police the host, and Cilium
    gives it the node's identity (``reserved:host`` / ``reserved:remote-node``), which no
    ``toEndpoints`` label selector selects. A pod that has finished (Succeeded/Failed) may
    have handed its address to a new pod already.
    """
    meta = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    status = raw.get("status") or {}
    if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    ips: list[str] = []
    for entry in status.get("podIPs") or ([{"ip": status["podIP"]}] if status.get("podIP") else []):
        text = entry.get("ip") if isinstance(entry, dict) else None
        try:
            ip = _intern(str(ipaddress.ip_address(str(text))))
        except ValueError:
            log.warning("pod %s/%s: status.podIPs has %r, not an address; ignored",
                        meta.get("namespace"), meta.get("name"), text)
            continue
        if ip not in ips:
            ips.append(ip)
    return PodObject(str(meta.get("name", "")), _intern(str(meta.get("namespace") or "default")),
                     _intern(str(spec.get("nodeName") or "")), _labels(meta.get("labels")), tuple(ips),
                     _intern(str(spec.get("serviceAccountName") or "default")))


def strip_namespace(raw: Mapping[str, Any]) -> NamespaceObject:
    meta = raw.get("metadata") or {}
    return NamespaceObject(_intern(str(meta.get("name", ""))), _labels(meta.get("labels")))


def strip_policy(kind: str, raw: Mapping[str, Any]) -> PolicyObject:
    """Parse one CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy object from the API."""
    meta = raw.get("metadata") or {}
    name, namespace = str(meta.get("name", "")), meta.get("namespace")
    qualified = f"{namespace}/{name}" if namespace else name
    key = qualified
    ref = f"{kind} {qualified}"
    # The list items of a custom resource may lack kind/apiVersion (the list has them).
    doc = {**raw, "kind": raw.get("kind") or kind, "apiVersion": raw.get("apiVersion") or f"{CILIUM_GROUP}/{CILIUM_VERSION}"}
    try:
        return PolicyObject(key, ref, parse_policy(doc, f"Kubernetes API {qualified}"), None)
    except PolicyError as exc:
        return PolicyObject(key, ref, None, str(exc))


@dataclass(frozen=True, slots=True)
class ServiceObject:
    key: str
    service: Service | None  # None: a Service the model cannot read (logged, left out)


def strip_service(raw: Mapping[str, Any]) -> ServiceObject:
    """A Service: its ClusterIPs, ports and selector (what a ClusterIP reaches, see
    flowtel/lib/policy/services.py)."""
    meta = raw.get("metadata") or {}
    name, namespace = str(meta.get("name", "")), str(meta.get("namespace") or "default")
    try:
        svc = service_from_spec(name, namespace, raw.get("spec") or {}, meta.get("labels") or {},
                                f"Service {namespace}/{name}")
    except PolicyError as exc:
        log.warning("%s; its ClusterIP allows nothing", exc)
        svc = None
    return ServiceObject(f"{namespace}/{name}", svc)


# -- the source ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KubeState:
    """What the API says, as of :attr:`version`: the policy input of one PolicySet."""

    version: int
    policies: list[Policy]
    errors: list[str]
    pods: list[Pod]  # this node's
    endpoints: EndpointIndex  # every node's pods, kept current (not a copy): toEndpoints' destinations
    services: tuple[Service, ...] = ()


O = TypeVar("O", bound=Keyed)


class _Store(Generic[O]):
    """The handler of one informer: a copy of its objects under the source's lock."""

    def __init__(self, source: KubeSource) -> None:
        self.items: dict[str, O] = {}
        self._source = source

    def on_add(self, obj: O) -> None:
        with self._source._lock:
            self.items[obj.key] = obj
        self._source._changed()

    def on_update(self, old: O, new: O) -> None:
        self.on_add(new)

    def on_delete(self, obj: O) -> None:
        with self._source._lock:
            self.items.pop(obj.key, None)
        self._source._changed()


class _Pods:
    """The pods informer's handler: every node's pods by namespace, and the endpoint index."""

    def __init__(self, source: KubeSource) -> None:
        self._source = source

    def on_add(self, obj: PodObject) -> None:
        self._source._pod_changed(None, obj)

    def on_update(self, old: PodObject, new: PodObject) -> None:
        self._source._pod_changed(old, new)

    def on_delete(self, obj: PodObject) -> None:
        self._source._pod_changed(obj, None)


class _Namespaces(_Store[NamespaceObject]):
    """Namespace labels are every pod's labels there: a change re-derives those pods' identities."""

    def on_add(self, obj: NamespaceObject) -> None:
        with self._source._lock:
            old = self.items.get(obj.key)
            self.items[obj.key] = obj
            if old is None or old.labels != obj.labels:
                self._source._relabel_namespace(obj.name)
        self._source._changed()

    def on_delete(self, obj: NamespaceObject) -> None:
        with self._source._lock:
            self.items.pop(obj.key, None)
            self._source._relabel_namespace(obj.name)
        self._source._changed()


@dataclass(frozen=True, slots=True)
class KubeOptions:
    """The informers' timing (seconds). As the k8sattributes processor's defaults, but a
    shorter first retry and request timeout: a policy change waits on them after an outage."""

    request_timeout: float = 10.0
    watch_timeout: float = 300.0
    page_size: int = 500
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


class KubeSource:
    """The informers and the state they add up to; start, read :meth:`state`, shut down."""

    def __init__(self, api: k8s.ApiClient, node_name: str, *, on_change: Callable[[], None] | None = None,
                 options: KubeOptions | None = None) -> None:
        if not node_name:
            raise ValueError("node_name is required: the proxy polices the pods of its own node")
        self.node_name = node_name
        self.server = kube_client.server_of(api)
        self._api = api
        self._on_change = on_change
        self._lock = threading.Lock()
        self._version = 0
        self._counts = dict.fromkeys(COUNTERS, 0)
        self.health = ApiHealth(COMPONENT, self.server, meanwhile=MEANWHILE, rbac_remedy=RBAC_REMEDY, logger=log)
        opts = options or KubeOptions()
        watch = WatchOptions(request_timeout=opts.request_timeout, watch_timeout=opts.watch_timeout,
                             page_size=opts.page_size, backoff_initial=opts.backoff_initial,
                             backoff_max=opts.backoff_max)
        core = k8s.CoreV1Api(api)
        custom = k8s.CustomObjectsApi(api)
        # Every node's pods by namespace (a namespace relabel touches its pods only); this
        # node's apart. Under self._lock, as the index's updates, so state() is consistent.
        self._pods_by_namespace: dict[str, dict[str, PodObject]] = {}
        self._local: dict[str, PodObject] = {}
        self._pod_count = 0
        self.endpoints = EndpointIndex()
        self._pods = _Pods(self)
        self._namespaces = _Namespaces(self)
        self._cnps: _Store[PolicyObject] = _Store(self)
        self._ccnps: _Store[PolicyObject] = _Store(self)
        self._services: _Store[ServiceObject] = _Store(self)
        cnp, ccnp = KINDS
        specs: list[tuple[str, Callable[..., Any], Callable[[Mapping[str, Any]], Any], Any, dict[str, str]]] = [
            # Every node's: toEndpoints selects peers anywhere in the cluster (this node's are
            # told apart by spec.nodeName). One informer, not a node-scoped one beside a
            # cluster-wide one: this node's pods would be listed, watched and held twice.
            ("pods", core.list_pod_for_all_namespaces, strip_pod, self._pods, {}),
            ("namespaces", core.list_namespace, strip_namespace, self._namespaces, {}),
            # ClusterIPs: the datapath sees them before kube-proxy's DNAT (the cluster DNS Service).
            ("services", core.list_service_for_all_namespaces, strip_service, self._services, {}),
            ("ciliumnetworkpolicies",
             functools.partial(custom.list_cluster_custom_object, CILIUM_GROUP, CILIUM_VERSION, "ciliumnetworkpolicies"),
             functools.partial(strip_policy, cnp), self._cnps, {}),
            ("ciliumclusterwidenetworkpolicies",
             functools.partial(custom.list_cluster_custom_object, CILIUM_GROUP, CILIUM_VERSION,
                               "ciliumclusterwidenetworkpolicies"),
             functools.partial(strip_policy, ccnp), self._ccnps, {}),
        ]
        self.informers: dict[str, Informer[Any]] = {
            name: Informer(name, lister, strip, store, watch, health=self.health, count=self._count, list_kwargs=kwargs)
            for name, lister, strip, store, kwargs in specs
        }

    @classmethod
    def connect(cls, kubeconfig: str | None, node_name: str, **kwargs: Any) -> KubeSource:
        """In-cluster credentials (the pod's ServiceAccount), or a kubeconfig; raises StartError
        with a remedy when the credentials cannot work."""
        auth = "kubeConfig" if kubeconfig else "serviceAccount"
        try:
            # One pooled connection per informer (each holds a watch open), and room for a relist.
            api = kube_client.connect(COMPONENT, auth, kubeconfig, None, pool_size=len(KINDS) + 4)
        except StartError as exc:
            # The problem as the shared client words it; the remedy in the proxy's own flags.
            raise StartError(COMPONENT, exc.problem,
                             "run the proxy as the dnsproxy DaemonSet (deploy/base/dnsproxy) with its ServiceAccount "
                             "token mounted, or outside a cluster pass --kubeconfig PATH") from None
        return cls(api, node_name, **kwargs)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for informer in self.informers.values():
            informer.start()

    @property
    def synced(self) -> bool:
        """Every informer has listed once: the state is the cluster's, not a partial one."""
        return all(i.synced.is_set() for i in self.informers.values())

    def unsynced(self) -> list[str]:
        return [name for name, i in self.informers.items() if not i.synced.is_set()]

    def shutdown(self) -> None:
        for informer in self.informers.values():
            informer.request_stop()  # all at once: each may be blocked in a read
        for informer in self.informers.values():
            informer.join()
        self._api.close()

    # -- reading -----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    def state(self) -> KubeState:
        """Policies (valid ones), rejections (naming each object), this node's pods and the
        cluster's endpoint index, now. Costs this node's pods, not the cluster's."""
        with self._lock:
            version = self._version
            pods = [self._pod(p) for p in self._local.values()]
            policy_objects = sorted([*self._cnps.items.values(), *self._ccnps.items.values()], key=lambda p: p.ref)
            services = tuple(o.service for _, o in sorted(self._services.items.items()) if o.service is not None)
        policies = [o.policy for o in policy_objects if o.policy is not None]
        errors = [o.error for o in policy_objects if o.error is not None]
        return KubeState(version, policies, errors, pods, self.endpoints, services)

    @property
    def cluster_pods(self) -> int:
        """Pods known on every node (with an address of their own)."""
        with self._lock:
            return self._pod_count

    def counters(self) -> dict[str, object]:
        with self._lock:
            counts: dict[str, object] = dict(self._counts)
            counts["cluster_pods"] = self._pod_count
            counts["local_pods"] = len(self._local)
        counts["identities"] = self.endpoints.identities()
        counts["synced"] = self.synced
        counts["api_healthy"] = self.health.healthy
        return counts

    # -- informer callbacks ------------------------------------------------------------------

    def _count(self, name: str, delta: int) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + delta

    def _changed(self) -> None:
        with self._lock:
            self._version += 1
        if self._on_change is not None:
            self._on_change()

    def _pod(self, p: PodObject) -> Pod:
        """The pod with the labels Cilium derives (namespace's, ServiceAccount); under the lock."""
        labels = dict(p.labels)
        ns = self._namespaces.items.get(p.namespace)
        labels.update(cilium_labels(dict(ns.labels) if ns is not None else {}, p.service_account))
        return Pod(p.name, p.namespace, labels, p.ips, p.node)

    def _identity(self, p: PodObject) -> Labels:
        return _share(tuple(sorted(self._pod(p).selector_labels().items())))

    def _pod_changed(self, old: PodObject | None, new: PodObject | None) -> None:
        """One pod added, changed or gone (any node): index it; a change of this node's
        pods is a new PolicySet input, a peer's only wakes the loop if a selector in use
        now selects other addresses."""
        with self._lock:
            endpoints = self.endpoints.version
            if old is not None:
                pods = self._pods_by_namespace[old.namespace]
                del pods[old.key]
                if not pods:
                    del self._pods_by_namespace[old.namespace]
                self._local.pop(old.key, None)
                self._pod_count -= 1
                if new is None:
                    self.endpoints.remove(old.key)
            if new is not None:
                self._pods_by_namespace.setdefault(new.namespace, {})[new.key] = new
                if new.node == self.node_name:
                    self._local[new.key] = new
                self._pod_count += 1
                self.endpoints.upsert(new.key, self._identity(new), new.ips)
            local = any(p is not None and p.node == self.node_name for p in (old, new))
            if local:
                self._version += 1
            notify = local or self.endpoints.version != endpoints
        if notify and self._on_change is not None:
            self._on_change()

    def _relabel_namespace(self, namespace: str) -> None:
        """Re-derive the identities of a namespace's pods; under the lock."""
        for p in self._pods_by_namespace.get(namespace, {}).values():
            self.endpoints.upsert(p.key, self._identity(p), p.ips)
