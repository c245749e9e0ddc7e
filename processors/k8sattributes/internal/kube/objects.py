"""API objects stripped to the fields flowtel reads, before anything is cached.

A pod as the API returns it is several kilobytes of JSON (containers, managedFields,
conditions); a :class:`PodMeta` is a slotted dataclass of a dozen references, most of them
interned strings shared by every pod of a workload. Equality of stripped objects is also
what lets the informers skip the many updates that change nothing flowtel uses (status
heartbeats, readiness, restarts).
"""
from __future__ import annotations

import ipaddress
import sys
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping, TypeVar

from cachetools import LRUCache

Labels = tuple[tuple[str, str], ...]
V = TypeVar("V")

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
KUBERNETES_SERVICE = ("default", "kubernetes")

_intern = sys.intern


class _Shared:
    """Equal immutable values (label sets, owner references) stored once, as sys.intern does
    for strings: every replica of a workload has the same labels and owner. Bounded: a
    value pushed out is only stored twice, never wrong."""

    def __init__(self, size: int) -> None:
        self._values: LRUCache[Any, Any] = LRUCache(maxsize=size)
        self._lock = threading.Lock()  # informer threads strip concurrently

    def __call__(self, value: V) -> V:
        with self._lock:
            return self._values.setdefault(value, value)


_share = _Shared(65536)


@dataclass(frozen=True, slots=True)
class OwnerRef:
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class PodMeta:
    uid: str
    namespace: str
    name: str
    node_name: str
    ips: tuple[str, ...]
    terminal: bool  # Succeeded/Failed: its IPs are free to be given to another pod
    created: float  # creationTimestamp, seconds since the epoch
    labels: Labels
    annotations: Labels  # only the keys an extract rule copies
    owner: OwnerRef | None  # the controller reference
    service_account: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


@dataclass(frozen=True, slots=True)
class ServiceMeta:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class NodeMeta:
    name: str
    internal_ips: tuple[str, ...]
    external_ips: tuple[str, ...]
    pod_cidrs: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class NamespaceMeta:
    name: str
    labels: Labels
    annotations: Labels  # only the keys an extract rule copies

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class ReplicaSetMeta:
    namespace: str
    name: str
    deployment: str | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class JobMeta:
    namespace: str
    name: str
    cronjob: str | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class EndpointSliceMeta:
    namespace: str
    name: str
    addresses: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_time(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


def _labels(raw: Mapping[str, Any] | None, keep: Callable[[str], bool] | None = None) -> Labels:
    if not raw:
        return ()
    return _share(tuple(sorted((_intern(str(k)), _intern(str(v))) for k, v in raw.items() if keep is None or keep(str(k)))))


def _controller(meta: Mapping[str, Any]) -> OwnerRef | None:
    for ref in meta.get("ownerReferences") or ():
        if ref.get("controller"):
            return _share(OwnerRef(_intern(ref.get("kind", "")), _intern(ref.get("name", ""))))
    return None


def _ip(text: str) -> str | None:
    # Canonical text, so "fd00:0::1" from the API and "fd00::1" from the kernel meet.
    try:
        return _intern(str(ipaddress.ip_address(text)))
    except ValueError:
        return None


def _ips(values: Any) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        ip = _ip(value) if isinstance(value, str) else None
        if ip is not None and ip not in out:
            out.append(ip)
    return tuple(out)


def strip_pod(raw: Mapping[str, Any], keep_annotation: Callable[[str], bool] | None = None) -> PodMeta | None:
    """The pod as flowtel caches it; None for hostNetwork pods, whose IP is their node's."""
    meta = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    status = raw.get("status") or {}
    if spec.get("hostNetwork"):
        return None
    pod_ips = [p.get("ip") for p in status.get("podIPs") or () if isinstance(p, Mapping)]
    if not pod_ips and status.get("podIP"):
        pod_ips = [status["podIP"]]
    return PodMeta(
        uid=meta.get("uid", ""),
        namespace=_intern(meta.get("namespace", "")),
        name=meta.get("name", ""),
        node_name=_intern(spec.get("nodeName") or ""),
        ips=_ips(pod_ips),
        terminal=status.get("phase") in TERMINAL_PHASES,
        created=parse_time(meta.get("creationTimestamp")),
        labels=_labels(meta.get("labels")),
        annotations=_labels(meta.get("annotations"), keep_annotation or (lambda _k: False)),
        owner=_controller(meta),
        service_account=_intern(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
    )


def strip_service(raw: Mapping[str, Any]) -> ServiceMeta:
    meta = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    # Headless services have clusterIP "None": no address to name.
    return ServiceMeta(_intern(meta.get("namespace", "")), _intern(meta.get("name", "")),
                       _ips(ip for ip in ips if ip and ip != "None"))


def strip_node(raw: Mapping[str, Any]) -> NodeMeta:
    meta = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    addresses = (raw.get("status") or {}).get("addresses") or ()
    internal = _ips(a.get("address") for a in addresses if a.get("type") == "InternalIP")
    external = _ips(a.get("address") for a in addresses if a.get("type") == "ExternalIP")
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    valid = []
    for cidr in cidrs:
        try:
            valid.append(str(ipaddress.ip_network(cidr, strict=False)))
        except ValueError:
            continue
    return NodeMeta(_intern(meta.get("name", "")), internal, external, tuple(valid))


def strip_namespace(raw: Mapping[str, Any], keep_annotation: Callable[[str], bool] | None = None) -> NamespaceMeta:
    meta = raw.get("metadata") or {}
    return NamespaceMeta(_intern(meta.get("name", "")), _labels(meta.get("labels")),
                         _labels(meta.get("annotations"), keep_annotation or (lambda _k: False)))


def strip_replicaset(raw: Mapping[str, Any]) -> ReplicaSetMeta:
    meta = raw.get("metadata") or {}
    owner = _controller(meta)
    deployment = owner.name if owner is not None and owner.kind == "Deployment" else None
    return ReplicaSetMeta(_intern(meta.get("namespace", "")), _intern(meta.get("name", "")), deployment)


def strip_job(raw: Mapping[str, Any]) -> JobMeta:
    meta = raw.get("metadata") or {}
    owner = _controller(meta)
    cronjob = owner.name if owner is not None and owner.kind == "CronJob" else None
    return JobMeta(_intern(meta.get("namespace", "")), _intern(meta.get("name", "")), cronjob)


def strip_endpointslice(raw: Mapping[str, Any]) -> EndpointSliceMeta:
    meta = raw.get("metadata") or {}
    addresses: list[str] = []
    for endpoint in raw.get("endpoints") or ():
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is False:
            continue
        addresses.extend(endpoint.get("addresses") or ())
    return EndpointSliceMeta(meta.get("namespace", ""), meta.get("name", ""), _ips(addresses))
