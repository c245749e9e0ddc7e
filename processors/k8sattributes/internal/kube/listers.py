"""The list/watch call of each resource kind the k8sattributes informers keep."""
from __future__ import annotations

import functools
from typing import Any, Callable

from kubernetes import client

# (API group, plural) of each kind listed and watched: the RBAC the processor needs.
RESOURCES: tuple[tuple[str, str], ...] = (
    ("", "pods"), ("", "services"), ("", "nodes"), ("", "namespaces"),
    ("apps", "replicasets"), ("batch", "jobs"), ("discovery.k8s.io", "endpointslices"),
)


def listers(api: client.ApiClient) -> dict[str, Callable[..., Any]]:
    """The list/watch call of each resource kind (one call serves both, with ``watch=True``)."""
    core = client.CoreV1Api(api)
    apps = client.AppsV1Api(api)
    batch = client.BatchV1Api(api)
    discovery = client.DiscoveryV1Api(api)
    return {
        "pods": core.list_pod_for_all_namespaces,
        "services": core.list_service_for_all_namespaces,
        "nodes": core.list_node,
        "namespaces": core.list_namespace,
        "replicasets": apps.list_replica_set_for_all_namespaces,
        "jobs": batch.list_job_for_all_namespaces,
        "endpointslices": functools.partial(discovery.list_namespaced_endpoint_slice, "default"),
    }
