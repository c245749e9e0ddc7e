"""Kubernetes Services: what a pod that sends to a ClusterIP actually reaches.

The datapath sees a pod's packet before kube-proxy's DNAT, so a packet to a Service's
ClusterIP still carries the ClusterIP. Cilium evaluates policy after its own load balancing,
on the backend; flowtel cannot know which backend kube-proxy will pick, so it allows a
ClusterIP on a Service port only when the pod's rules allow **every** backend (the pods the
Service's selector selects) on that port's target port: never less restrictive than Cilium.
This is what lets a DNS rule's ``toEndpoints: k8s-app=kube-dns`` allow the cluster DNS
Service IP, as it does in Cilium. ``toServices`` allows a Service's backends (and so its
ClusterIP) as Cilium does.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from flowtel.lib.policy.errors import PolicyError
from flowtel.lib.policy.ports import PROTOCOLS
from flowtel.lib.policy.selectors import NAMESPACE_LABEL, Requirement, Selector


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    protocol: int  # 6, 17 or 132
    target_port: int | None  # None: a named target port (resolved per pod; flowtel cannot)


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    selector: tuple[tuple[str, str], ...] | None  # None: no selector (manual endpoints: unknown backends)
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def backend_selector(self) -> Selector | None:
        if self.selector is None:
            return None
        reqs = [Requirement(k, "In", (v,)) for k, v in self.selector]
        return Selector((*reqs, Requirement(NAMESPACE_LABEL, "In", (self.namespace,))))


def service_from_spec(name: str, namespace: str, spec: Mapping[str, Any], labels: Mapping[str, str],
                      where: str) -> Service:
    """A Service from its ``spec`` (the API's shape: clusterIPs/clusterIP, ports, selector)."""
    ips = list(spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []))
    cluster_ips = []
    for ip in ips:
        if str(ip) in ("None", ""):
            continue  # headless: pods are reached by their own addresses
        try:
            cluster_ips.append(str(ipaddress.ip_address(str(ip))))
        except ValueError:
            raise PolicyError(f"{where}: clusterIP {ip!r} is not an address") from None
    ports = []
    for i, p in enumerate(spec.get("ports") or []):
        if not isinstance(p, Mapping) or "port" not in p:
            raise PolicyError(f"{where}.ports[{i}]: expected port (and protocol, targetPort)")
        proto = PROTOCOLS.get(str(p.get("protocol") or "TCP").upper())
        if not proto:
            raise PolicyError(f"{where}.ports[{i}].protocol: {p.get('protocol')!r} is not TCP, UDP or SCTP")
        target = p.get("targetPort", p["port"])
        ports.append(ServicePort(int(p["port"]), proto, int(target) if str(target).isdigit() else None))
    sel = spec.get("selector")
    selector = tuple(sorted((str(k), str(v)) for k, v in sel.items())) if isinstance(sel, Mapping) and sel else None
    return Service(name, namespace, tuple(cluster_ips), tuple(ports), selector,
                   tuple(sorted((str(k), str(v)) for k, v in labels.items())))


def load_services(path: str | Path) -> list[Service]:
    """``--services``: ``services: [{name, namespace, labels, spec: {clusterIP(s), ports, selector}}]``
    (a Service object's metadata and spec; ``kubectl get svc -A -o yaml``'s items read as is)."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"services file {path}: cannot read: {exc}") from None
    items = doc.get("services", doc.get("items")) if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise PolicyError(f"services file {path}: expected a mapping with a services (or items) list")
    out = []
    for i, raw in enumerate(items):
        where = f"services file {path}: services[{i}]"
        if not isinstance(raw, dict):
            raise PolicyError(f"{where}: expected a mapping")
        meta = raw.get("metadata") or raw
        spec = raw.get("spec") or {}
        if not isinstance(meta, dict) or not meta.get("name") or not isinstance(spec, dict):
            raise PolicyError(f"{where}: expected metadata.name (or name) and spec")
        out.append(service_from_spec(str(meta["name"]), str(meta.get("namespace") or "default"), spec,
                                     meta.get("labels") or {}, where))
    return out
