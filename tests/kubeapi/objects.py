"""Builders of API objects as the API server returns them (the fields flowtel reads, and
some it must ignore: containers, managedFields, status conditions)."""
from __future__ import annotations

import uuid
from typing import Any

_CONTROLLERS = {
    "ReplicaSet": "apps/v1",
    "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "CronJob": "batch/v1",
    "Node": "v1",
}


def owner_ref(kind: str, name: str, *, controller: bool = True) -> dict[str, Any]:
    return {"apiVersion": _CONTROLLERS.get(kind, "example.com/v1"), "kind": kind, "name": name,
            "uid": str(uuid.uuid4()), "controller": controller, "blockOwnerDeletion": True}


def _managed_fields() -> list[dict[str, Any]]:
    # What real objects carry and flowtel must never keep: often the biggest part of a pod.
    return [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                                                   "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {}}}}}]


def pod(
    name: str,
    namespace: str = "default",
    *,
    ip: str | None = None,
    ips: tuple[str, ...] = (),
    node: str = "node-1",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    owner: tuple[str, str] | None = None,
    host_network: bool = False,
    phase: str = "Running",
    uid: str | None = None,
    service_account: str = "default",
    created: str | None = None,
) -> dict[str, Any]:
    all_ips = list(ips) if ips else ([ip] if ip else [])
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {}),
                            "annotations": dict(annotations or {}), "managedFields": _managed_fields()}
    if owner is not None:
        meta["ownerReferences"] = [owner_ref(*owner)]
        meta["generateName"] = name.rsplit("-", 1)[0] + "-"
    if uid:
        meta["uid"] = uid
    if created:
        meta["creationTimestamp"] = created
    status: dict[str, Any] = {
        "phase": phase,
        "hostIP": "192.0.2.1",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}],
        "containerStatuses": [{"name": "app", "ready": True, "restartCount": 0, "image": "registry.example/app:1.0",
                               "imageID": "registry.example/app@sha256:" + "0" * 64, "containerID": "containerd://" + "1" * 64}],
    }
    if all_ips:
        status["podIP"] = all_ips[0]
        status["podIPs"] = [{"ip": x} for x in all_ips]
    return {
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "serviceAccountName": service_account,
            "containers": [{"name": "app", "image": "registry.example/app:1.0",
                            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                            "env": [{"name": "MODE", "value": "production"}],
                            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}],
        },
        "status": status,
    }


def service(name: str, namespace: str = "default", *, cluster_ip: str, cluster_ips: tuple[str, ...] = (),
            labels: dict[str, str] | None = None) -> dict[str, Any]:
    ips = list(cluster_ips) if cluster_ips else [cluster_ip]
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": ips, "type": "ClusterIP",
                 "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}], "selector": {"app": name}},
    }


def node(name: str, *, internal_ip: str, external_ip: str | None = None, pod_cidr: str | None = None,
         labels: dict[str, str] | None = None) -> dict[str, Any]:
    addresses = [{"type": "InternalIP", "address": internal_ip}, {"type": "Hostname", "address": name}]
    if external_ip:
        addresses.append({"type": "ExternalIP", "address": external_ip})
    spec: dict[str, Any] = {}
    if pod_cidr:
        spec = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": spec,
        "status": {"addresses": addresses, "conditions": [{"type": "Ready", "status": "True"}],
                   "nodeInfo": {"kubeletVersion": "v1.31.0", "osImage": "Debian GNU/Linux 12"}},
    }


def namespace(name: str, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
                         "annotations": dict(annotations or {})},
            "status": {"phase": "Active"}}


def replicaset(name: str, namespace: str = "default", *, deployment: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if deployment:
        meta["ownerReferences"] = [owner_ref("Deployment", deployment)]
    return {"metadata": meta, "spec": {"replicas": 2}, "status": {"replicas": 2, "readyReplicas": 2}}


def job(name: str, namespace: str = "default", *, cronjob: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if cronjob:
        meta["ownerReferences"] = [owner_ref("CronJob", cronjob)]
    return {"metadata": meta, "spec": {"completions": 1}, "status": {"active": 1}}


def endpointslice(name: str = "kubernetes", namespace: str = "default", *, service: str = "kubernetes",
                  addresses: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
    }


def endpoints(name: str = "kubernetes", namespace: str = "default", *, addresses: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace},
            "subsets": [{"addresses": [{"ip": a} for a in addresses], "ports": [{"name": "https", "port": 6443}]}]}


def cilium_network_policy(name: str, namespace: str = "default", *, spec: dict[str, Any],
                          labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A CiliumNetworkPolicy (cilium.io/v2) as the API serves it: with the status Cilium's
    operator writes, which flowtel must ignore."""
    return {"metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {}), "generation": 1},
            "spec": spec, "status": {"conditions": [{"type": "Valid", "status": "True"}]}}


def cilium_clusterwide_network_policy(name: str, *, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "generation": 1}, "spec": spec}
