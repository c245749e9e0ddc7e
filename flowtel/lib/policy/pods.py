"""Pods as the policy model sees them, and the pods file (processors/k8sattributes' static shape)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import yaml

from flowtel.lib.policy.errors import PolicyError
from flowtel.lib.policy.selectors import NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL

# A label set as a sorted tuple of pairs: hashable, so equal sets are one identity.
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    ips: tuple[str, ...]
    node: str = ""  # spec.nodeName; "" (a pods file without node keys): this node

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selector_labels(self) -> dict[str, str]:
        return {**self.labels, NAMESPACE_LABEL: self.namespace}

    def identity(self) -> Labels:
        """The label set selectors see, as :class:`EndpointIndex` keys it."""
        return tuple(sorted(self.selector_labels().items()))

    def on_node(self, node: str) -> bool:
        """Whether the pod runs on ``node``; a pod or a proxy that names no node counts as local."""
        return not node or not self.node or self.node == node


def load_pods(path: str | Path) -> list[Pod]:
    """The pods file: processors/k8sattributes' static source shape. Read here: ``pods:`` (name,
    namespace, ips, labels, node, service_account) and ``namespaces:`` (name, labels); other
    keys of that format are ignored. Pods get the labels Cilium derives, as with ``--kube``:
    ``io.cilium.k8s.policy.serviceaccount`` and their namespace's labels as
    ``io.cilium.k8s.namespace.labels.<key>``. A pod whose ``node`` is another node than the
    proxy's (``$NODE_NAME``) is a peer: selectable by ``toEndpoints``, never policed here."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"pods file {path}: cannot read: {exc}") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"pods file {path}: expected a mapping with a pods list")
    namespaces: dict[str, dict[str, str]] = {}
    for i, raw in enumerate(doc.get("namespaces") or []):
        if not isinstance(raw, dict) or not raw.get("name") or not isinstance(raw.get("labels") or {}, dict):
            raise PolicyError(f"pods file {path}: namespaces[{i}]: expected a mapping with name (and labels)")
        namespaces[str(raw["name"])] = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
    pods = []
    for i, raw in enumerate(doc.get("pods") or []):
        where = f"pods file {path}: pods[{i}]"
        if not isinstance(raw, dict) or not raw.get("name"):
            raise PolicyError(f"{where}: expected a mapping with name")
        ips = []
        for ip in raw.get("ips") or []:
            try:
                ips.append(str(ipaddress.ip_address(str(ip))))
            except ValueError:
                raise PolicyError(f"{where}.ips: {ip!r} is not an address (CIDRs are not pods here)") from None
        if not isinstance(raw.get("labels") or {}, dict):
            raise PolicyError(f"{where}.labels: expected a mapping of label to value")
        namespace = str(raw.get("namespace") or "default")
        labels = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
        labels.update(cilium_labels(namespaces.get(namespace, {}), str(raw.get("service_account") or "default")))
        pods.append(Pod(str(raw["name"]), namespace, labels, tuple(ips), str(raw.get("node") or "")))
    return pods


def load_node_addresses(path: str | Path, node: str) -> tuple[list[str], list[str]]:
    """From the pods file's ``nodes: [{name, ips}]`` and ``kube_apiserver: [ip]`` (the same
    keys processors/k8sattributes reads): the other nodes' addresses (every node but ``node``;
    none when ``node`` is empty: which one is this node is then unknown) and the API server's."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"pods file {path}: cannot read: {exc}") from None
    if not isinstance(doc, dict):
        return [], []
    remote: list[str] = []
    for i, raw in enumerate(doc.get("nodes") or []):
        if not isinstance(raw, dict) or not raw.get("name"):
            raise PolicyError(f"pods file {path}: nodes[{i}]: expected a mapping with name and ips")
        if node and str(raw["name"]) != node:
            remote.extend(_addresses(raw.get("ips") or [], f"pods file {path}: nodes[{i}].ips"))
    api = _addresses(doc.get("kube_apiserver") or [], f"pods file {path}: kube_apiserver")
    return remote, api


def _addresses(raw: list, where: str) -> list[str]:
    out = []
    for ip in raw:
        try:
            out.append(str(ipaddress.ip_address(str(ip))))
        except ValueError:
            raise PolicyError(f"{where}: {ip!r} is not an address") from None
    return out


def cilium_labels(namespace_labels: Mapping[str, str], service_account: str) -> dict[str, str]:
    """The labels Cilium adds to every endpoint from its namespace and ServiceAccount."""
    out = {NAMESPACE_LABELS_PREFIX + k: v for k, v in namespace_labels.items()}
    out[SERVICE_ACCOUNT_LABEL] = service_account
    return out


