"""Hubble's ``peer.Peer`` service: every flowtel agent of the cluster, for Hubble Relay.

Relay calls ``Notify`` on one agent (through the ``hubble-peer`` Service), gets one
``PEER_ADDED`` per agent, then every change while the stream is open, and dials each
address. Peers are the running pods of flowtel's DaemonSet, from the Kubernetes API (list
and watch, as the k8sattributes processor does). Each address is ``IP:PORT`` (``[IPv6]:PORT``)
of the port the agents actually listen on; ``tls`` is present only when this server serves
TLS, with Hubble's server name ``<node>.<cluster>.hubble-grpc.cilium.io`` (dots in either
name become dashes), so Relay verifies each agent as it verifies Cilium's. Without the
``peers`` config the agent is its own only peer.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import grpc

from extensions.hubble.config import PeersConfig
from flowtel.component import Telemetry
from flowtel.errors import StartError
from flowtel.lib.hubble.api.peer import peer_pb2, peer_pb2_grpc

if TYPE_CHECKING:
    from extensions.hubble import kube

log = logging.getLogger("flowtel.extensions.hubble")

DEFAULT_CLUSTER = "default"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# A subscriber that falls this far behind is disconnected; Relay reconnects and gets a fresh
# snapshot, which is exact, where a queue with holes would not be.
MAX_PENDING = 4096
POLL_SECONDS = 1.0


def tls_server_name(node: str, cluster: str) -> str:
    """Hubble's TLS server name for a node: ``<node>.<cluster>.hubble-grpc.cilium.io``."""
    return f"{node.replace('.', '-')}.{cluster.replace('.', '-')}.hubble-grpc.cilium.io"


def peer_name(node: str, cluster: str) -> str:
    """``node``, or ``cluster/node`` outside Cilium's default cluster (Hubble's Fullname)."""
    return node if cluster == DEFAULT_CLUSTER else f"{cluster}/{node}"


def dial_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    address: str
    tls_server_name: str | None

    def notification(self, kind: "peer_pb2.ChangeNotificationType") -> peer_pb2.ChangeNotification:
        cn = peer_pb2.ChangeNotification(name=self.name, address=self.address, type=kind)
        if self.tls_server_name is not None:
            cn.tls.server_name = self.tls_server_name
        return cn


class _Subscriber:
    def __init__(self) -> None:
        self.queue: deque[peer_pb2.ChangeNotification] = deque()
        self.overflowed = False
        self.cond = threading.Condition()


class PeerRegistry:
    """The current peers and the open Notify streams; fed by the pod watcher."""

    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}
        self._subs: list[_Subscriber] = []
        self._lock = threading.Lock()

    def peers(self) -> list[Peer]:
        with self._lock:
            return sorted(self._peers.values(), key=lambda p: p.name)

    def _publish(self, note: peer_pb2.ChangeNotification) -> None:
        for sub in self._subs:
            with sub.cond:
                if len(sub.queue) >= MAX_PENDING:
                    sub.overflowed = True
                else:
                    sub.queue.append(note)
                sub.cond.notify()

    def upsert(self, key: str, peer: Peer) -> None:
        with self._lock:
            prev = self._peers.get(key)
            if prev == peer:
                return
            self._peers[key] = peer
            if prev is not None and prev.name != peer.name:
                self._publish(prev.notification(peer_pb2.PEER_DELETED))
                self._publish(peer.notification(peer_pb2.PEER_ADDED))
            else:
                self._publish(peer.notification(peer_pb2.PEER_ADDED if prev is None else peer_pb2.PEER_UPDATED))

    def delete(self, key: str) -> None:
        with self._lock:
            prev = self._peers.pop(key, None)
            if prev is not None:
                self._publish(prev.notification(peer_pb2.PEER_DELETED))

    def subscribe(self) -> tuple[list[Peer], _Subscriber]:
        sub = _Subscriber()
        with self._lock:
            self._subs.append(sub)
            return sorted(self._peers.values(), key=lambda p: p.name), sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)


class PeerService(peer_pb2_grpc.PeerServicer):
    def __init__(self, registry: PeerRegistry, stopping: threading.Event) -> None:
        self.registry = registry
        self._stopping = stopping

    def Notify(self, request: peer_pb2.NotifyRequest,
               context: grpc.ServicerContext) -> Iterator[peer_pb2.ChangeNotification]:
        current, sub = self.registry.subscribe()
        try:
            for peer in current:
                yield peer.notification(peer_pb2.PEER_ADDED)
            while context.is_active() and not self._stopping.is_set():
                with sub.cond:
                    if not sub.queue and not sub.overflowed:
                        sub.cond.wait(POLL_SECONDS)
                    pending = list(sub.queue)
                    sub.queue.clear()
                    overflowed = sub.overflowed
                for note in pending:
                    yield note
                if overflowed:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  "peer changes arrived faster than this stream read them; call Notify again")
        finally:
            self.registry.unsubscribe(sub)


# --- the DaemonSet's pods as peers ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentPod:
    """The parts of an agent pod that make a peer (what the informer keeps)."""

    key: str
    node: str
    ip: str
    ready: bool


def strip_pod(raw: Mapping[str, Any]) -> AgentPod | None:
    """An agent pod from the API's JSON, or None when it cannot be dialled (no node, no IP,
    not running, or being deleted)."""
    meta = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    status = raw.get("status") or {}
    node = spec.get("nodeName") or ""
    ip = status.get("podIP") or ""
    if not node or not ip or status.get("phase") != "Running" or meta.get("deletionTimestamp"):
        return None
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    return AgentPod(f"{meta.get('namespace', '')}/{meta.get('name', '')}", node, ip, ready)


class PodPeers:
    """Informer handler: agent pods in, peers out (a pod that is not Ready is no peer yet)."""

    def __init__(self, registry: PeerRegistry, port: int, cluster: str, tls: bool) -> None:
        self.registry = registry
        self.port = port
        self.cluster = cluster
        self.tls = tls

    def _peer(self, pod: AgentPod) -> Peer:
        return Peer(peer_name(pod.node, self.cluster), dial_address(pod.ip, self.port),
                    tls_server_name(pod.node, self.cluster) if self.tls else None)

    def on_add(self, pod: AgentPod) -> None:
        if pod.ready:
            self.registry.upsert(pod.key, self._peer(pod))

    def on_update(self, old: AgentPod, new: AgentPod) -> None:
        if new.ready:
            self.registry.upsert(new.key, self._peer(new))
        else:
            self.registry.delete(new.key)

    def on_delete(self, pod: AgentPod) -> None:
        self.registry.delete(pod.key)


def own_namespace() -> str:
    """This pod's namespace: $POD_NAMESPACE (downward API), else the service account's."""
    ns = os.environ.get("POD_NAMESPACE", "")
    if ns:
        return ns
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip()
    except OSError:
        return ""


def watch_agent_pods(owner: str, cfg: PeersConfig, registry: PeerRegistry, *, port: int, tls: bool,
                     telemetry: Telemetry, on_health: Callable[[str | None], None]) -> "kube.Informer[AgentPod]":
    """Start the informer that keeps ``registry`` equal to the cluster's agent pods."""
    from extensions.hubble import kube  # the Kubernetes client: only an agent with `peers` loads it

    namespace = cfg.namespace or own_namespace()
    if not namespace:
        raise StartError(owner, "peers: the agents' namespace is unknown",
                         f"set extensions.{owner}.peers.namespace, or POD_NAMESPACE from the downward API "
                         "(deploy/ does)")
    if not port:
        raise StartError(owner, "peers: a unix socket endpoint has no port other agents could dial",
                         f"set extensions.{owner}.peers.port to the agents' TCP port")
    api = kube.connect(owner, cfg.auth_type, cfg.kubeconfig, cfg.context, pool_size=2)
    remedy = kube.rbac_remedy(kube.access(owner, cfg.auth_type, cfg.kubeconfig, cfg.context))
    health = kube.ApiHealth(owner, kube.server_of(api), on_health,
                            meanwhile="Peer/Notify keeps answering with the agents last seen", rbac_remedy=remedy,
                            logger=log)
    options = kube.WatchOptions(request_timeout=cfg.request_timeout, watch_timeout=cfg.watch_timeout,
                                page_size=500, backoff_initial=1.0, backoff_max=30.0)
    informer: kube.Informer[AgentPod] = kube.Informer(
        "agent-pods", kube.pods_lister(api), strip_pod, PodPeers(registry, port, cfg.cluster_name, tls),
        options, health=health, count=functools.partial(telemetry.add, owner),
        list_kwargs={"label_selector": cfg.label_selector, "field_selector": f"metadata.namespace={namespace}"},
    )
    informer.start()
    return informer
