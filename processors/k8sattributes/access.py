"""The Kubernetes access the processor's config asks for, in its own settings' words."""
from __future__ import annotations

from typing import Sequence

from flowtel.preflight import KubernetesAccess, Requirement
from processors.k8sattributes.config import K8sAttributesConfig
from processors.k8sattributes.internal.kube.listers import RESOURCES

COMPONENT = "k8sattributes"


def kube_access(config: K8sAttributesConfig, component: str = COMPONENT) -> KubernetesAccess | None:
    """None when the processor reads no API (a static source)."""
    if config.auth_type is None:
        return None
    return KubernetesAccess(
        component=component,
        auth_type=config.auth_type,
        kubeconfig=config.kubeconfig,
        context=config.context,
        resources=RESOURCES,
        use_kubeconfig=f"set processors.{component}.auth_type: kubeConfig (and kubeconfig: PATH, or $KUBECONFIG)",
        kubeconfig_setting=f"processors.{component}.kubeconfig",
        in_cluster="flowtel as its DaemonSet (deploy/base) with the ServiceAccount token mounted",
        rbac_manifest="deploy/base/rbac.yaml",
        purpose="pod, workload and service names of flows (k8s.* attributes, Hubble endpoints)",
    )


def preflight(config: K8sAttributesConfig) -> Sequence[Requirement]:
    access = kube_access(config)
    return () if access is None else (access,)
