"""The official client, configured from ``auth_type``, and the list calls the informers use.

Credentials that cannot work (no kubeconfig, not in a pod) stop the agent with a remedy:
retrying would never help. An API server that does not answer does not: that is the
informers' business, and the agent runs meanwhile.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

from kubernetes import client, config
from kubernetes.config.incluster_config import InClusterConfigLoader

from flowtel.errors import StartError

# Where Kubernetes mounts a pod's service account; tests point it at their own files.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def connect(component: str, auth_type: str, kubeconfig: str | None, context: str | None, *, pool_size: int) -> client.ApiClient:
    cfg = client.Configuration()
    if auth_type == "serviceAccount":
        sa_dir = SERVICE_ACCOUNT_DIR
        try:
            InClusterConfigLoader(token_filename=os.path.join(sa_dir, "token"),
                                  cert_filename=os.path.join(sa_dir, "ca.crt")).load_and_set(cfg)
        except config.ConfigException as exc:
            raise StartError(
                component,
                f"auth_type serviceAccount, but the in-cluster configuration is unusable: {exc} "
                f"(needs KUBERNETES_SERVICE_HOST/PORT and {sa_dir}/token and ca.crt)",
                "run flowtel as the DaemonSet with its ServiceAccount token mounted, or outside a cluster "
                "set auth_type: kubeConfig (and kubeconfig: PATH or $KUBECONFIG)",
            ) from None
    elif auth_type == "kubeConfig":
        spec = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        paths = [os.path.expanduser(p) for p in spec.split(os.pathsep) if p]
        if not any(os.path.isfile(p) for p in paths):
            raise StartError(
                component,
                f"auth_type kubeConfig, but the kubeconfig {', '.join(paths)} does not exist",
                "set kubeconfig: PATH (or $KUBECONFIG) to a kubeconfig; `kubectl config view --raw > FILE` writes one",
            )
        try:
            config.load_kube_config(config_file=os.pathsep.join(paths), context=context,
                                    client_configuration=cfg, persist_config=False)
        except Exception as exc:  # ConfigException, YAML errors: all mean "this file is unusable"
            raise StartError(
                component,
                f"the kubeconfig {', '.join(paths)} is unusable: {type(exc).__name__}: {exc}",
                f"check it with `kubectl --kubeconfig {paths[0]} config view`; it needs a current-context "
                "(or `context:`) with a cluster server and credentials",
            ) from None
    else:
        raise StartError(component, f"unknown auth_type {auth_type!r}", "set auth_type to serviceAccount or kubeConfig")
    cfg.retries = False  # the informers back off and retry themselves, and count it
    cfg.connection_pool_maxsize = pool_size
    return client.ApiClient(cfg)


def server_of(api: client.ApiClient) -> str:
    return str(api.configuration.host)


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
