"""The ``hubble`` extension: taps the logs pipelines into a flow store and serves it with
Hubble's Observer and Peer gRPC services."""
from __future__ import annotations

import logging
import operator
import os
import threading
from typing import TYPE_CHECKING

from extensions.hubble.config import HubbleConfig, PeersConfig
from extensions.hubble.observer import NodeInfo, ObserverService
from extensions.hubble.peer import (
    DEFAULT_CLUSTER, AgentPod, Peer, PeerRegistry, PeerService, dial_address, peer_name, tls_server_name,
    watch_agent_pods,
)
from extensions.hubble.server import GrpcServer
from flowtel.component import CreateSettings, Extension
from flowtel.lib.hubble import convert
from flowtel.lib.hubble.api.observer import observer_pb2_grpc
from flowtel.lib.hubble.api.peer import peer_pb2_grpc
from flowtel.lib.hubble.store import FlowStore
from flowtel.records import Record

if TYPE_CHECKING:  # the Kubernetes client loads only where `peers` is configured (~20 MB in every agent)
    from extensions.hubble.kube import Informer

log = logging.getLogger("flowtel.extensions.hubble")

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"flowtel v{version('flowtel')}"
    except PackageNotFoundError:
        return "flowtel"


# A record's wall-clock ns, read by a C call per record (every record type has time_ns).
_time_ns = operator.attrgetter("time_ns")


class HubbleExtension(Extension):
    taps = ("logs",)

    def __init__(self, settings: CreateSettings, config: HubbleConfig) -> None:
        super().__init__(settings)
        self.config = config
        # Records go into the ring as they are; each becomes its Cilium message when first read.
        self.store = FlowStore(node_name=settings.node_name, capacity=config.buffer_size,
                               follower_capacity=config.follower_buffer_size, max_followers=config.max_followers,
                               convert=convert.to_response, time_of=_time_ns)
        cluster = config.peers.cluster_name if config.peers is not None else DEFAULT_CLUSTER
        self.cluster = cluster
        self.node = NodeInfo(settings.node_name, _version(),
                             tls_server_name(settings.node_name, cluster) if config.tls is not None else None)
        self.peers = PeerRegistry()
        self.server: GrpcServer | None = None
        self._stopping = threading.Event()
        self._informer: Informer[AgentPod] | None = None
        t = settings.telemetry
        t.register_gauge(settings.id, "ring_size", lambda: self.store.stats()["num_flows"])
        t.register_gauge(settings.id, "followers", lambda: self.store.stats()["followers"])

    @property
    def endpoint(self) -> str:
        """Where it listens (the bound port when the config says port 0)."""
        return self.server.endpoint if self.server is not None else self.config.endpoint

    def _advertised_host(self) -> str:
        if self.config.node_address:
            return self.config.node_address
        for var in ("NODE_IP", "POD_IP"):
            if os.environ.get(var):
                return os.environ[var]
        assert self.server is not None
        return self.server.host if self.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"

    def start(self) -> None:
        self.server = GrpcServer(self.settings.id, self.config, [
            (observer_pb2_grpc.add_ObserverServicer_to_server,
             ObserverService(self.store, self.node, self.settings.telemetry, self.settings.id, self._stopping)),
            (peer_pb2_grpc.add_PeerServicer_to_server, PeerService(self.peers, self._stopping)),
        ])
        if self.server.kind == "unix":
            self.node.address = self.server.endpoint
        else:
            self.node.address = dial_address(self._advertised_host(), self.server.port)
        if self.config.peers is None:
            self.peers.upsert("self", Peer(peer_name(self.node.name, self.cluster), self.node.address,
                                           self.node.tls_server_name))
        else:
            self._start_peers(self.config.peers)
        log.info("%s: Hubble API (observer.Observer, peer.Peer) on %s%s", self.settings.id, self.endpoint,
                 " with TLS" if self.config.tls is not None else "")

    def _start_peers(self, cfg: PeersConfig) -> None:
        assert self.server is not None
        self._informer = watch_agent_pods(
            self.settings.id, cfg, self.peers, port=cfg.port or self.server.port, tls=self.config.tls is not None,
            telemetry=self.settings.telemetry, on_health=self._on_api_health)

    def _on_api_health(self, error: str | None) -> None:
        from flowtel.component import Status

        self.report_status(Status.RECOVERABLE_ERROR if error else Status.OK, error)

    def consume(self, batch: list[Record]) -> None:
        lost = self.store.add(batch)
        self.settings.telemetry.add(self.settings.id, "flows_in", len(batch))
        if lost:
            self.settings.telemetry.add(self.settings.id, "follower_flows_lost", lost)

    def shutdown(self) -> None:
        self._stopping.set()
        self.store.close()
        if self._informer is not None:
            self._informer.request_stop()
            self._informer.join()
        if self.server is not None:
            self.server.stop()
