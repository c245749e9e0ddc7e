"""Metadata from a file, for hosts without Kubernetes (and ``flowtel demo``).

The file says who is behind which address, in Kubernetes' own terms, and produces the
same endpoint views as the API source (same labels, identities, workloads, attributes):

.. code-block:: yaml

    pods:
      - name: frontend-7c9d
        namespace: shop
        ips: [10.0.0.5, "10.0.8.0/24"]       # addresses or CIDRs
        labels: {app: frontend}
        workloads: [{kind: Deployment, name: frontend}, {kind: ReplicaSet, name: frontend-7c9d}]
        node: node-1
    services:
      - {name: payments, namespace: shop, ips: [10.96.0.20]}
    nodes:
      - {name: node-1, ips: [192.168.0.10]}  # the agent's own node is reserved:host
    kube_apiserver: [10.96.0.1]
    namespaces:
      - {name: shop, labels: {team: payments}}

Precedence is the API source's: a pod's exact address, a service, a node, the API
server, then the longest pod CIDR, then ``reserved:world``. The file is read at start.
"""
from __future__ import annotations

import ipaddress
import math
from typing import Annotated

import pydantic
import yaml
from pydantic import BeforeValidator, Field

from flowtel.component import ComponentConfig
from flowtel.errors import StartError
from processors.k8sattributes.addresses import PrefixTable
from processors.k8sattributes.internal.kube.objects import OwnerRef, PodMeta
from processors.k8sattributes.metadata import WORLD, EndpointView, ViewBuilder, fallback


def _address(value: object) -> str:
    text = str(value)
    try:
        return str(ipaddress.ip_address(text)) if "/" not in text else str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f"expected an IP address or CIDR, got {text!r}") from None


Address = Annotated[str, BeforeValidator(_address)]


class StaticWorkload(ComponentConfig):
    kind: str
    name: str


class StaticPod(ComponentConfig):
    name: str
    namespace: str = "default"
    ips: tuple[Address, ...] = Field(min_length=1)
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    workloads: tuple[StaticWorkload, ...] = ()  # the top-level workload first
    node: str = ""
    service_account: str = "default"
    uid: str = ""


class StaticService(ComponentConfig):
    name: str
    namespace: str = "default"
    ips: tuple[Address, ...] = Field(min_length=1)


class StaticNode(ComponentConfig):
    name: str
    ips: tuple[Address, ...] = Field(min_length=1)


class StaticNamespace(ComponentConfig):
    name: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class StaticFile(ComponentConfig):
    pods: tuple[StaticPod, ...] = ()
    services: tuple[StaticService, ...] = ()
    nodes: tuple[StaticNode, ...] = ()
    kube_apiserver: tuple[Address, ...] = ()
    namespaces: tuple[StaticNamespace, ...] = ()


def _pairs(d: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in d.items()))


class StaticSource:
    def __init__(self, component: str, path: str, *, node_name: str, builder: ViewBuilder) -> None:
        self.component = component
        self.path = path
        self.node_name = node_name
        self._builder = builder
        self._exact: dict[str, EndpointView] = {}
        self._cidrs: PrefixTable[EndpointView] = PrefixTable()
        self._counts: dict[str, float] = {}

    def start(self) -> None:
        # Two passes, so that what the source keeps is not spread over the YAML parse's heap:
        # parsing 10k pods makes ≈ 130 MB of short-lived Python objects (nodes, marks, dicts),
        # and the views, metas and label strings built from them would sit in the same
        # pymalloc arenas, which go back to the kernel only once entirely free (measured: 142
        # arenas held for 25 MB of live objects, +128 MB resident for good). So the validated
        # file is re-encoded as JSON (3 MB for 10k pods), everything of the parse is freed
        # (its arenas with it), and the views are built from that JSON (pydantic-core parses
        # it in Rust: ≈ 20 MB transient, 0.3 s).
        text = self._read().model_dump_json()
        data = StaticFile.model_validate_json(text)
        del text
        builder = self._builder
        namespaces = {ns.name: ns for ns in data.namespaces}
        pods: dict[str, EndpointView] = {}
        pod_cidrs: list[tuple[str, EndpointView]] = []
        for p in data.pods:
            ns = namespaces.get(p.namespace)
            meta = PodMeta(
                uid=p.uid, namespace=p.namespace, name=p.name, node_name=p.node, ips=(), terminal=False, created=0.0,
                labels=_pairs(p.labels), annotations=_pairs(p.annotations),
                owner=OwnerRef(p.workloads[0].kind, p.workloads[0].name) if p.workloads else None,
                service_account=p.service_account,
            )
            chain = tuple((w.kind, w.name) for w in p.workloads)
            view = builder.pod(meta, chain, _pairs(ns.labels) if ns else (), _pairs(ns.annotations) if ns else ())
            for ip in p.ips:
                if "/" in ip:
                    pod_cidrs.append((ip, view))
                else:
                    pods[ip] = view
        apiserver = set(data.kube_apiserver)
        addresses: dict[str, EndpointView] = {}
        for n in data.nodes:
            for ip in n.ips:
                addresses[ip] = builder.node(n.name, host=n.name == self.node_name, kube_apiserver=ip in apiserver)
        for ip in apiserver:
            addresses.setdefault(ip, builder.kube_apiserver())
        services = {ip: builder.service(s.namespace, s.name, kube_apiserver=False) for s in data.services for ip in s.ips}
        # One dict, lowest precedence first: a pod's address overrides a service's, a node's.
        exact: dict[str, EndpointView] = {}
        for table in (addresses, services, pods):
            exact.update(table)
        self._exact = exact
        for cidr, view in pod_cidrs:
            self._cidrs.add(cidr, view)
        self._counts = {"static_pods": len(data.pods), "static_services": len(data.services),
                        "static_nodes": len(data.nodes), "static_addresses": len(exact) + len(pod_cidrs)}

    def _read(self) -> StaticFile:
        remedy = "fix the file (see the k8sattributes README, section 'static source') and restart"
        try:
            with open(self.path, encoding="utf-8") as f:
                # libyaml's parser when PyYAML has it (Debian's does): 4x faster, the same safe loader.
                raw = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        except OSError as exc:
            raise StartError(self.component, f"cannot read the static metadata file {self.path}: {exc.strerror}", remedy) from None
        except yaml.YAMLError as exc:
            raise StartError(self.component, f"{self.path} is not valid YAML: {exc}", remedy) from None
        try:
            return StaticFile.model_validate(raw)
        except pydantic.ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
            msg = "unknown key" if err["type"] == "extra_forbidden" else str(err["msg"]).removeprefix("Value error, ")
            raise StartError(self.component, f"{self.path}: {loc or 'top level'}: {msg}", remedy) from None

    def shutdown(self) -> None:
        """Nothing to release: the file was read once, at start."""

    def lookup(self, ip: str, when: float) -> EndpointView:
        view = self._exact.get(ip)
        if view is not None:
            return view
        view = self._cidrs.lookup(ip)
        return view if view is not None else fallback(ip)

    def lookup_span(self, ip: str, when: float) -> tuple[EndpointView, float, float]:
        return self.lookup(ip, when), -math.inf, math.inf  # a file read once: the same at any time

    def gauges(self) -> dict[str, float]:
        return dict(self._counts)
