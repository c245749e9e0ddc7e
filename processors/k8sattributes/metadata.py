"""What an address resolves to, ready to be put on a flow as its endpoint.

An :class:`EndpointView` is computed once per pod (or service, node, reserved address)
with its immutable :class:`~flowtel.records.Endpoint`, which every record naming that pod
shares (``EndpointView.shared``). Both metadata sources (the Kubernetes API and the static file) build views with
the same :class:`ViewBuilder`, so their output cannot drift apart.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol

from flowtel.records import Endpoint, Workload, frozen_extensions
from flowtel.lib import identity
from processors.k8sattributes.extract import Extractor
from processors.k8sattributes.internal.kube.objects import PodMeta
from processors.k8sattributes.workload import KIND_ATTRIBUTES, Chain

# Every attribute this processor can write besides extracted labels and annotations.
METADATA_KEYS: tuple[str, ...] = (
    "k8s.namespace.name",
    "k8s.pod.name",
    "k8s.pod.uid",
    "k8s.node.name",
    "k8s.deployment.name",
    "k8s.replicaset.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.job.name",
    "k8s.cronjob.name",
    "k8s.service.name",
    "k8s.cluster.name",
)
# k8s.cluster.name is the same on every record, so it is opt-in.
DEFAULT_METADATA: tuple[str, ...] = tuple(k for k in METADATA_KEYS if k != "k8s.cluster.name")


class Kind:
    """What an address turned out to be (the ``resolved_*`` counters use these names)."""

    POD = "pod"
    SERVICE = "service"
    NODE = "node"
    KUBE_APISERVER = "kube_apiserver"
    UNKNOWN = "unknown"  # inside a node's pod CIDR, but no pod is known there (yet)
    WORLD = "world"


@dataclass(frozen=True, slots=True)
class EndpointView:
    kind: str
    identity: int
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()
    workloads: tuple[Workload, ...] = ()
    cluster_name: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    # The record-side Endpoint, built once: records are immutable, so every record of
    # this pod shares the same object instead of a copy each.
    shared: Endpoint = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", frozen_extensions(self.attributes))
        object.__setattr__(self, "shared", Endpoint(
            identity=self.identity,
            namespace=self.namespace,
            pod_name=self.pod_name,
            labels=self.labels,
            workloads=self.workloads,
            cluster_name=self.cluster_name,
            attributes=self.attributes,
        ))

    def endpoint(self) -> Endpoint:
        return self.shared

    def merged(self, ep: Endpoint) -> Endpoint:
        """A new endpoint: ``ep`` (from an earlier stage) with this view put on it; what
        ``ep`` set stays unless this view names it."""
        return Endpoint(
            identity=self.identity,
            namespace=self.namespace or ep.namespace,
            pod_name=self.pod_name or ep.pod_name,
            labels=self.labels or ep.labels,
            workloads=self.workloads or ep.workloads,
            cluster_name=self.cluster_name or ep.cluster_name,
            attributes=frozen_extensions({**ep.attributes, **self.attributes}) if self.attributes else ep.attributes,
        )


def _workloads(chain: Chain) -> tuple[Workload, ...]:
    # Hubble names one workload: the top of the chain.
    return (Workload(name=chain[0][1], kind=chain[0][0]),) if chain else ()


WORLD = EndpointView(Kind.WORLD, identity.IDENTITY_WORLD, labels=(identity.LABEL_WORLD,))
# Loopback traffic (seen by the node-wide TCP and drop tracepoints) never leaves the host
# that reports it: Hubble names it reserved:host, never world.
_HOST_IDENTITY, _HOST_LABELS = identity.reserved(host=True)
LOOPBACK = EndpointView(Kind.NODE, _HOST_IDENTITY, labels=_HOST_LABELS)


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


def fallback(ip: str) -> EndpointView:
    """What an address no pod, service or node holds is: the host's loopback, or the world."""
    return LOOPBACK if is_loopback(ip) else WORLD


class MetadataSource(Protocol):
    """Where views come from: the Kubernetes API or a static file."""

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def lookup(self, ip: str, when: float) -> EndpointView:
        """The view of ``ip`` as of ``when`` (seconds since the epoch). Never blocks."""
        ...

    def lookup_span(self, ip: str, when: float) -> tuple[EndpointView, float, float]:
        """:meth:`lookup`, and the times ``[lo, hi]`` (``when`` among them) over which the
        answer for ``ip`` is the same with the caches as they are now: the processor reuses
        it for the batch's other records of the address in that span."""
        ...

    def gauges(self) -> dict[str, float]: ...


class ViewBuilder:
    def __init__(self, *, cluster_name: str, metadata: Iterable[str], extractor: Extractor) -> None:
        self.cluster_name = cluster_name
        self.metadata = frozenset(metadata)
        self.extractor = extractor
        # Replicas share labels and workload: their views share those parts (bounded caches;
        # a miss only costs a rebuild).
        self._labels = functools.lru_cache(maxsize=16384)(self._identity_labels)
        self._workloads = functools.lru_cache(maxsize=16384)(_workloads)

    def _identity_labels(
        self, labels: tuple[tuple[str, str], ...], namespace: str, namespace_labels: tuple[tuple[str, str], ...], service_account: str,
    ) -> tuple[int, tuple[str, ...]]:
        strings = tuple(sys.intern(s) for s in identity.pod_labels(labels, namespace, namespace_labels, service_account, self.cluster_name))
        return identity.identity_of(strings), strings

    def _attrs(self, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
        wanted = self.metadata
        out = {k: v for k, v in pairs if v and k in wanted}
        if self.cluster_name and "k8s.cluster.name" in wanted:
            out["k8s.cluster.name"] = self.cluster_name
        return out

    def pod(
        self,
        pod: PodMeta,
        chain: Chain,
        namespace_labels: tuple[tuple[str, str], ...],
        namespace_annotations: tuple[tuple[str, str], ...],
    ) -> EndpointView:
        ident, labels = self._labels(pod.labels, pod.namespace, namespace_labels, pod.service_account)
        attrs = self._attrs([
            ("k8s.namespace.name", pod.namespace),
            ("k8s.pod.name", pod.name),
            ("k8s.pod.uid", pod.uid),
            ("k8s.node.name", pod.node_name),
            *((KIND_ATTRIBUTES[kind], name) for kind, name in chain if kind in KIND_ATTRIBUTES),
        ])
        attrs.update(self.extractor.attributes(pod.labels, pod.annotations, namespace_labels, namespace_annotations))
        return EndpointView(
            Kind.POD,
            ident,
            namespace=pod.namespace,
            pod_name=pod.name,
            labels=labels,
            workloads=self._workloads(chain),
            cluster_name=self.cluster_name,
            attributes=attrs,
        )

    def service(self, namespace: str, name: str, *, kube_apiserver: bool) -> EndpointView:
        # A ClusterIP is no endpoint of its own in Cilium (it is translated before Hubble
        # sees it), so it has no security identity: flowtel sees it before kube-proxy's
        # DNAT and names the service instead. The API's own ClusterIP is kube-apiserver.
        if kube_apiserver:
            ident, labels = identity.reserved(kube_apiserver=True)
        else:
            ident, labels = identity.IDENTITY_UNKNOWN, ()
        attrs = self._attrs([("k8s.namespace.name", namespace), ("k8s.service.name", name)])
        return EndpointView(Kind.KUBE_APISERVER if kube_apiserver else Kind.SERVICE, ident,
                            namespace=namespace, labels=labels, attributes=attrs)

    def node(self, name: str, *, host: bool, kube_apiserver: bool) -> EndpointView:
        ident, labels = identity.reserved(host=host, remote_node=not host, kube_apiserver=kube_apiserver)
        return EndpointView(Kind.NODE, ident, labels=labels, attributes=self._attrs([("k8s.node.name", name)]))

    def kube_apiserver(self) -> EndpointView:
        ident, labels = identity.reserved(kube_apiserver=True)
        return EndpointView(Kind.KUBE_APISERVER, ident, labels=labels)

    def unknown_pod_address(self, node_name: str) -> EndpointView:
        # A pod address no pod is known for (not yet seen, long gone, or another node's pod
        # in node-scoped mode): saying "world" would be wrong, so it stays unnamed, with
        # the node whose pod CIDR holds it.
        return EndpointView(Kind.UNKNOWN, identity.IDENTITY_UNKNOWN, attributes=self._attrs([("k8s.node.name", node_name)]))
