"""The ``flows`` extension: taps the logs pipelines into a :class:`FlowHub` and serves it."""
from __future__ import annotations

import logging
import threading
from typing import Any

from extensions.flows.config import FlowsConfig, split_endpoint
from extensions.flows.hub import FlowHub
from extensions.flows.server import FlowHTTPServer
from flowtel.component import CreateSettings, Extension
from flowtel.errors import StartError
from flowtel.records import Record
from flowtel.servicegraph import ServiceGraph

log = logging.getLogger("flowtel.extensions.flows")


def hub_from_config(settings: CreateSettings, config: FlowsConfig) -> FlowHub:
    sm = config.service_map
    return FlowHub(
        owner=settings.id,
        node_name=settings.node_name,
        telemetry=settings.telemetry,
        buffer_size=config.buffer_size,
        client_buffer_size=config.client_buffer_size,
        max_followers=config.max_followers,
        graph=ServiceGraph(granularity=sm.granularity, expire_after=sm.expire_after, max_edges=sm.max_edges),
    )


def bind(settings: CreateSettings, endpoint: str, hub: FlowHub, **kw: Any) -> FlowHTTPServer:
    """The HTTP server on ``endpoint``, or a StartError that says how to free or change it."""
    host, port = split_endpoint(endpoint)
    try:
        return FlowHTTPServer((host, port), hub, **kw)
    except OSError as exc:
        raise StartError(
            settings.id,
            f"cannot listen on {endpoint}: {exc.strerror or exc}",
            f"set extensions.{settings.id}.endpoint to a free HOST:PORT, or stop what holds it "
            f"(`ss -ltnp 'sport = :{port}'` shows it; another flowtel agent on this node?)",
        ) from None


class FlowsExtension(Extension):
    taps = ("logs",)

    def __init__(self, settings: CreateSettings, config: FlowsConfig) -> None:
        super().__init__(settings)
        self.config = config
        self.hub = hub_from_config(settings, config)
        self.server: FlowHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """Where it listens (the bound port when the config says port 0)."""
        return self.server.endpoint if self.server is not None else self.config.endpoint

    def start(self) -> None:
        self.server = bind(self.settings, self.config.endpoint, self.hub)
        self._thread = self.server.serve_in_thread(f"flowtel-{self.settings.id}")
        log.info("%s: flow API on http://%s (/flows, /map, /healthz)", self.settings.id, self.endpoint)

    def consume(self, batch: list[Record]) -> None:
        self.hub.add(batch)

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self._thread is not None:
            self._thread.join(5)
