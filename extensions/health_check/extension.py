"""The ``health_check`` extension: serves readiness and liveness over HTTP."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

from extensions.health_check import health
from extensions.health_check.config import HealthCheckConfig, split_endpoint
from flowtel.component import CreateSettings, Extension
from flowtel.errors import StartError

log = logging.getLogger("flowtel.extensions.health_check")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], answer: Callable[[str], health.Answer | None], paths: tuple[str, ...]
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.answer = answer
        self.paths = paths
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "flowtel-health"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self._respond(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(with_body=False)

    def _respond(self, *, with_body: bool) -> None:
        answer = self.server.answer(urlsplit(self.path).path)
        if answer is None:
            answer = health.Answer(404, {"status": "Not found", "paths": list(self.server.paths)})
        payload = json.dumps(answer.body, separators=(",", ":")).encode()
        self.send_response(answer.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if with_body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # Probes every few seconds would flood the agent's log; keep them at debug.
        log.debug("%s %s", self.address_string(), format % args)


class HealthCheckExtension(Extension):
    def __init__(self, settings: CreateSettings, config: HealthCheckConfig) -> None:
        super().__init__(settings)
        self.config = config
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ready_since_ns: int | None = None

    @property
    def endpoint(self) -> str:
        """Where it listens (the bound port when the config says port 0)."""
        if self._server is None:
            return self.config.endpoint
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host  # bytes only for AF_UNIX, never here
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def start(self) -> None:
        host, port = split_endpoint(self.config.endpoint)
        try:
            self._server = _Server((host, port), self._answer, (self.config.path, self.config.liveness_path))
        except OSError as exc:
            raise StartError(
                self.settings.id,
                f"cannot listen on {self.config.endpoint}: {exc.strerror or exc}",
                f"set extensions.{self.settings.id}.endpoint to a free HOST:PORT, or stop what holds it "
                f"(`ss -ltnp 'sport = :{port}'` shows it; another flowtel agent on this node?)",
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name=f"flowtel-{self.settings.id}", daemon=True
        )
        self._thread.start()
        log.info("%s: readiness on http://%s%s, liveness on %s", self.settings.id, self.endpoint,
                 self.config.path, self.config.liveness_path)

    def ready(self) -> None:
        self._ready_since_ns = time.time_ns()

    def not_ready(self) -> None:
        self._ready_since_ns = None

    def _answer(self, path: str) -> health.Answer | None:
        statuses = self.settings.telemetry.statuses()
        if path == self.config.path:
            return health.readiness(statuses, self._ready_since_ns)
        if path == self.config.liveness_path:
            return health.liveness(statuses)
        return None

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
