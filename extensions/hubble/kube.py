"""The Kubernetes access of the peer watcher: the project's one list-and-watch
implementation (flowtel.lib.kube), with the hubble extension's own settings in its remedies."""
from __future__ import annotations

from typing import Any, Callable

from kubernetes import client as k8s

from flowtel.lib.kube.client import connect as _connect
from flowtel.lib.kube.client import server_of
from flowtel.lib.kube.health import ApiHealth, rbac_remedy
from flowtel.lib.kube.informer import Informer, WatchOptions
from flowtel.preflight import KubernetesAccess

__all__ = ["ApiHealth", "Informer", "WatchOptions", "access", "connect", "pods_lister", "rbac_remedy", "server_of"]

# (API group, plural) the peer watcher lists and watches: the agent's own DaemonSet pods.
RESOURCES: tuple[tuple[str, str], ...] = (("", "pods"),)


def access(owner: str, auth_type: str, kubeconfig: str | None, context: str | None) -> KubernetesAccess:
    """How ``extensions.<owner>.peers`` reaches the API server, in its own settings' words."""
    return KubernetesAccess(
        component=owner,
        auth_type=auth_type,
        kubeconfig=kubeconfig,
        context=context,
        resources=RESOURCES,
        use_kubeconfig=f"set extensions.{owner}.peers.auth_type: kubeConfig",
        kubeconfig_setting=f"extensions.{owner}.peers.kubeconfig",
        in_cluster="the agent as the flowtel DaemonSet (deploy/base) with its ServiceAccount token mounted",
        rbac_manifest="deploy/base/rbac.yaml",
        purpose="the flowtel agent pods of the cluster (Peer/Notify, for Hubble Relay)",
    )


def connect(owner: str, auth_type: str, kubeconfig: str | None, context: str | None, *,
            pool_size: int) -> k8s.ApiClient:
    return _connect(access(owner, auth_type, kubeconfig, context), pool_size=pool_size)


def pods_lister(api: k8s.ApiClient) -> Callable[..., Any]:
    """The list/watch call of every pod (one call serves both, with ``watch=True``)."""
    return k8s.CoreV1Api(api).list_pod_for_all_namespaces
