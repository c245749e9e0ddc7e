"""A flow API endpoint: an extension that taps the logs pipelines into a :class:`FlowHub` and
serves it over HTTP. The ``flows`` extension is this; the ``ui`` extension is this with its
page's files beside the API (each its own hub and port, so either works without the other)."""
from __future__ import annotations

import logging
from pathlib import Path

from flowtel.component import CreateSettings, Extension
from flowtel.errors import StartError
from flowtel.lib.flowapi.hub import FlowHub
from flowtel.lib.flowapi.server import FlowAPI
from flowtel.lib.flowapi.settings import FlowAPISettings, split_endpoint
from flowtel.lib.http import BoundedHTTPServer, Limits
from flowtel.records import Record
from flowtel.servicegraph import ServiceGraph

log = logging.getLogger("flowtel.flowapi")


def hub_from_config(settings: CreateSettings, config: FlowAPISettings) -> FlowHub:
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


# Workers beside the follow streams (each holds one while it runs) for every other request.
SPARE_WORKERS = 4


def bind(settings: CreateSettings, config: FlowAPISettings, api: FlowAPI) -> BoundedHTTPServer:
    """The HTTP server on the config's endpoint, or a StartError that says how to free or change it."""
    host, port = split_endpoint(config.endpoint)
    try:
        return BoundedHTTPServer(
            component=settings.id, telemetry=settings.telemetry, host=host, port=port, handler=api,
            limits=Limits.from_settings(config, threads=config.max_followers + SPARE_WORKERS), browser=config)
    except OSError as exc:
        raise StartError(
            settings.id,
            f"cannot listen on {config.endpoint}: {exc.strerror or exc}",
            f"set extensions.{settings.id}.endpoint to a free HOST:PORT, or stop what holds it "
            f"(`ss -ltnp 'sport = :{port}'` shows it; another flowtel agent on this node?)",
        ) from None


class FlowAPIExtension(Extension):
    """Serves the flow API (``/flows``, ``/map``, ``/healthz``) of its own hub; subclasses say
    what else is served beside it (``start``)."""

    taps = ("logs",)

    def __init__(self, settings: CreateSettings, config: FlowAPISettings) -> None:
        super().__init__(settings)
        self.config = config
        self.hub = hub_from_config(settings, config)
        self.server: BoundedHTTPServer | None = None
        self.api: FlowAPI | None = None

    @property
    def endpoint(self) -> str:
        """Where it listens (the bound port when the config says port 0)."""
        return self.server.endpoint if self.server is not None else self.config.endpoint

    def _serve(self, api_prefix: str = "", static_dir: Path | None = None) -> None:
        self.api = FlowAPI(self.hub, api_prefix=api_prefix, static_dir=static_dir)
        self.server = bind(self.settings, self.config, self.api)
        self.server.start(f"flowtel-{self.settings.id}")

    def start(self) -> None:
        self._serve()
        log.info("%s: flow API on http://%s (/flows, /map, /healthz)", self.settings.id, self.endpoint)

    def consume(self, batch: list[Record]) -> None:
        self.hub.add(batch)

    def shutdown(self) -> None:
        if self.api is not None:
            self.api.stopping.set()
        self.hub.close()  # ends the follow streams, which frees their workers
        if self.server is not None:
            self.server.stop()
            self.server = None
