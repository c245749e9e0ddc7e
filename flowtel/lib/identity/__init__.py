"""Identities and labels as Hubble prints them for an endpoint.

Cilium gives every endpoint a numeric security identity: reserved ones for what is not a
pod (``reserved:host`` 1, ``reserved:world`` 2, ``reserved:remote-node`` 6,
``reserved:kube-apiserver`` 7) and one per distinct set of identity-relevant labels for
pods. flowtel has no identity allocator shared by a cluster, so a pod's number is derived
from its label set: the same labels give the same number on every node and every restart,
in Cilium's cluster-local range (256-65535). Two label sets can collide on a number; the
labels themselves, printed beside it, never do.

Which labels count is Cilium's default filter (pkg/labelsfilter): everything except
Kubernetes-internal and per-pod keys (``pod-template-hash``, ``controller-revision-hash``,
``statefulset.kubernetes.io/pod-name``, …), plus the namespace, the namespace's labels,
the service account and the cluster name under Cilium's ``io.cilium.k8s.*`` keys.
"""
from __future__ import annotations

import functools
import hashlib
import re
from typing import Iterable

IDENTITY_UNKNOWN = 0
IDENTITY_HOST = 1
IDENTITY_WORLD = 2
IDENTITY_REMOTE_NODE = 6
IDENTITY_KUBE_APISERVER = 7

LABEL_HOST = "reserved:host"
LABEL_WORLD = "reserved:world"
LABEL_REMOTE_NODE = "reserved:remote-node"
LABEL_KUBE_APISERVER = "reserved:kube-apiserver"

_FIRST_LOCAL_IDENTITY = 256
_LOCAL_IDENTITIES = 65536 - _FIRST_LOCAL_IDENTITY

POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"

# (pattern, include): anchored at the key's start; the longest match decides, an include
# beats an exclude of the same length, and a key no pattern matches is included.
_FILTER: tuple[tuple[re.Pattern[str], bool], ...] = tuple(
    (re.compile(pattern), include)
    for pattern, include in (
        (re.escape(POD_NAMESPACE_LABEL), True),
        (re.escape(NAMESPACE_LABELS_PREFIX.rstrip(".")), True),
        (r"app\.kubernetes\.io", True),
        (re.escape(CLUSTER_LABEL), True),
        (re.escape(SERVICE_ACCOUNT_LABEL), True),
        (r"io\.kubernetes", False),
        (r"kubernetes\.io", False),
        (r"statefulset\.kubernetes\.io/pod-name", False),
        (r"apps\.kubernetes\.io/pod-index", False),
        (r"batch\.kubernetes\.io/job-completion-index", False),
        (r"batch\.kubernetes\.io/controller-uid", False),
        (r".*beta\.kubernetes\.io", False),
        (r"k8s\.io", False),
        (r"pod-template-generation", False),
        (r"pod-template-hash", False),
        (r"controller-revision-hash", False),
        (r"controller-uid", False),
        (r"annotation.*", False),
        (r"etcd_node", False),
    )
)


@functools.lru_cache(maxsize=4096)
def is_identity_label(key: str) -> bool:
    """Whether Cilium's default label filter keeps ``key`` for identities (and Hubble's labels)."""
    best_len, include = -1, True
    for pattern, incl in _FILTER:
        m = pattern.match(key)
        if m is None:
            continue
        n = m.end()
        if n > best_len or (n == best_len and incl):
            best_len, include = n, incl
    return include


def pod_labels(
    labels: Iterable[tuple[str, str]],
    namespace: str,
    namespace_labels: Iterable[tuple[str, str]],
    service_account: str,
    cluster_name: str,
) -> tuple[str, ...]:
    """The sorted ``k8s:key=value`` strings Hubble shows for a pod."""
    out = [f"k8s:{k}={v}" for k, v in labels if is_identity_label(k)]
    out.extend(f"k8s:{NAMESPACE_LABELS_PREFIX}{k}={v}" for k, v in namespace_labels)
    out.append(f"k8s:{POD_NAMESPACE_LABEL}={namespace}")
    if service_account:
        out.append(f"k8s:{SERVICE_ACCOUNT_LABEL}={service_account}")
    if cluster_name:
        out.append(f"k8s:{CLUSTER_LABEL}={cluster_name}")
    return tuple(sorted(set(out)))


def identity_of(labels: Iterable[str]) -> int:
    """A stable number in Cilium's cluster-local range for one set of identity labels."""
    digest = hashlib.blake2b("\n".join(sorted(labels)).encode(), digest_size=8).digest()
    return _FIRST_LOCAL_IDENTITY + int.from_bytes(digest, "big") % _LOCAL_IDENTITIES


def reserved(*, host: bool = False, remote_node: bool = False, kube_apiserver: bool = False) -> tuple[int, tuple[str, ...]]:
    """Identity and labels of a non-pod address, combined as Cilium combines them.

    The host keeps identity 1 even when it also serves the API; another node that serves
    the API becomes ``kube-apiserver`` (7), with both labels.
    """
    labels = []
    if host:
        labels.append(LABEL_HOST)
    if kube_apiserver:
        labels.append(LABEL_KUBE_APISERVER)
    if remote_node and not host:
        labels.append(LABEL_REMOTE_NODE)
    if host:
        return IDENTITY_HOST, tuple(sorted(labels))
    if kube_apiserver:
        return IDENTITY_KUBE_APISERVER, tuple(sorted(labels))
    if remote_node:
        return IDENTITY_REMOTE_NODE, tuple(labels)
    return IDENTITY_WORLD, (LABEL_WORLD,)
