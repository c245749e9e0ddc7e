"""The ``prometheus`` exporter: an HTTP server with the latest value of every series on /metrics."""
from __future__ import annotations

import errno
import gzip
import logging

from exporters.common.series import SeriesStore
from exporters.prometheus.config import PrometheusConfig, split_host_port
from exporters.prometheus.exposition import CONTENT_TYPE, render
from flowtel.component import CreateSettings, Exporter
from flowtel.errors import StartError
from flowtel.lib.http import BoundedHTTPServer, Limits, Request, Response
from flowtel.records import MetricPoint, Record

log = logging.getLogger("flowtel.exporters.prometheus")


class PrometheusExporter(Exporter):
    def __init__(self, settings: CreateSettings, config: PrometheusConfig) -> None:
        super().__init__(settings)
        self.config = config
        self._store = SeriesStore(settings.id, config.cardinality_limit, config.series_ttl)
        self._server: BoundedHTTPServer | None = None
        settings.telemetry.register_gauge(settings.id, "series", lambda: len(self._store))

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound: with port 0 in the config, the one the kernel chose."""
        if self._server is None:
            raise RuntimeError("the exporter is not started")
        return self._server.address

    def start(self) -> None:
        host, port = split_host_port(self.config.endpoint)
        try:
            self._server = BoundedHTTPServer(
                component=self.settings.id, telemetry=self.settings.telemetry, host=host, port=port,
                handler=self._handle, limits=Limits.from_settings(self.config, threads=2))
        except OSError as exc:
            remedy = (
                "another process (a second agent, node-exporter, …) holds that port: stop it or choose "
                "another port in exporters.prometheus.endpoint"
                if exc.errno == errno.EADDRINUSE
                else "use an address of this node (0.0.0.0 for all) in exporters.prometheus.endpoint"
            )
            raise StartError(self.settings.id, f"cannot serve on {self.config.endpoint}: {exc.strerror or exc}",
                             remedy) from exc
        self._server.start(f"flowtel-{self.settings.id}")

    def _handle(self, request: Request) -> Response:
        if request.path != "/metrics":
            return Response(404, b"flowtel serves Prometheus metrics on /metrics\n", "text/plain; charset=utf-8")
        body = self.page().encode()  # a failure is a 500, logged once by the server
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(200, gzip.compress(body, 1), CONTENT_TYPE, {"Content-Encoding": "gzip"})
        return Response(200, body, CONTENT_TYPE)

    def consume(self, batch: list[Record]) -> None:
        if not batch:
            return
        cid = self.settings.id
        telemetry = self.settings.telemetry
        telemetry.add(cid, "records_in", len(batch))
        if not all(isinstance(r, MetricPoint) for r in batch):
            raise TypeError("the prometheus exporter takes metric points only (use it in metrics pipelines)")
        result = self._store.update(batch)  # type: ignore[arg-type]
        telemetry.add(cid, "series_refused", result.refused)
        telemetry.add(cid, "records_dropped", result.refused)

    def page(self) -> str:
        """What a scrape returns now."""
        telemetry = self.settings.telemetry
        telemetry.add(self.settings.id, "series_expired", self._store.expire())
        families = self._store.collect("cumulative", 0)
        if not self.config.self_telemetry:
            return render(families)
        snapshot = telemetry.snapshot()
        # Telemetry keeps counters and gauges apart but shows one snapshot; a key is a
        # counter exactly when the counter store knows it (gauges are never added to).
        counters = frozenset(k for k in snapshot if telemetry.get(*k) != 0)
        return render(families, snapshot, counters)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
