"""The ``prometheus`` exporter: an HTTP server with the latest value of every series on /metrics."""
from __future__ import annotations

import errno
import gzip
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from flowtel.lib.metrics.series import SeriesStore
from exporters.prometheus.config import PrometheusConfig, split_host_port
from flowtel.lib.metrics.exposition import CONTENT_TYPE, render
from flowtel.component import CreateSettings, Exporter
from flowtel.errors import StartError
from flowtel.records import MetricPoint, Record

log = logging.getLogger("flowtel.exporters.prometheus")


class PrometheusExporter(Exporter):
    def __init__(self, settings: CreateSettings, config: PrometheusConfig) -> None:
        super().__init__(settings)
        self.config = config
        self._store = SeriesStore(settings.id, config.cardinality_limit, config.series_ttl)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        settings.telemetry.register_gauge(settings.id, "series", lambda: len(self._store))

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound: with port 0 in the config, the one the kernel chose."""
        if self._server is None:
            raise RuntimeError("the exporter is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        host, port = split_host_port(self.config.endpoint)
        server_class = _IPv6Server if ":" in host else _Server
        try:
            self._server = server_class((host, port), _MetricsHandler)
        except OSError as exc:
            remedy = (
                "another process (a second agent, node-exporter, …) holds that port: stop it or choose "
                "another port in exporters.prometheus.endpoint"
                if exc.errno == errno.EADDRINUSE
                else "use an address of this node (0.0.0.0 for all) in exporters.prometheus.endpoint"
            )
            raise StartError(self.settings.id, f"cannot serve on {self.config.endpoint}: {exc.strerror or exc}",
                             remedy) from exc
        self._server.render = self.page
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"flowtel-{self.settings.id}",
                                        daemon=True)
        self._thread.start()

    def consume(self, batch: list[Record]) -> None:
        if not batch:
            return
        cid = self.settings.id
        telemetry = self.settings.telemetry
        telemetry.add(cid, "records_in", len(batch))
        if not all(isinstance(r, MetricPoint) for r in batch):
            raise TypeError("the prometheus exporter takes metric points only (use it in metrics pipelines)")
        result = self._store.update(batch)  # type: ignore[arg-type]  # every record was checked to be a MetricPoint just above
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
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    render: Callable[[], str]


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _MetricsHandler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, b"flowtel serves Prometheus metrics on /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            body = self.server.render().encode()
        except Exception:
            log.exception("rendering /metrics failed")
            self._send(500, b"internal error rendering metrics; see the agent's log\n", "text/plain; charset=utf-8")
            return
        gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
        self._send(200, gzip.compress(body, 1) if gzipped else body, CONTENT_TYPE, gzipped)

    def _send(self, status: int, body: bytes, content_type: str, gzipped: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        log.debug("%s " + format, self.address_string(), *args)
