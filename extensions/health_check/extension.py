"""The ``health_check`` extension: serves readiness and liveness over HTTP."""
from __future__ import annotations

import logging
import time

from extensions.health_check import health
from extensions.health_check.config import HealthCheckConfig, split_endpoint
from flowtel.component import CreateSettings, Extension
from flowtel.errors import StartError
from flowtel.lib.http import BoundedHTTPServer, Limits, Request, Response, json_response

log = logging.getLogger("flowtel.extensions.health_check")


class HealthCheckExtension(Extension):
    def __init__(self, settings: CreateSettings, config: HealthCheckConfig) -> None:
        super().__init__(settings)
        self.config = config
        self._server: BoundedHTTPServer | None = None
        self._ready_since_ns: int | None = None

    @property
    def endpoint(self) -> str:
        """Where it listens (the bound port when the config says port 0)."""
        if self._server is None:
            return self.config.endpoint
        return self._server.endpoint

    def start(self) -> None:
        host, port = split_endpoint(self.config.endpoint)
        try:
            # Probes are answered by workers of their own: a flood of other requests
            # elsewhere in the agent never queues in front of them.
            self._server = BoundedHTTPServer(
                component=self.settings.id, telemetry=self.settings.telemetry, host=host, port=port,
                handler=self._handle, limits=Limits.from_settings(self.config, threads=2))
        except OSError as exc:
            raise StartError(
                self.settings.id,
                f"cannot listen on {self.config.endpoint}: {exc.strerror or exc}",
                f"set extensions.{self.settings.id}.endpoint to a free HOST:PORT, or stop what holds it "
                f"(`ss -ltnp 'sport = :{port}'` shows it; another flowtel agent on this node?)",
            ) from None
        self._server.start(f"flowtel-{self.settings.id}")
        log.info("%s: readiness on http://%s%s, liveness on %s", self.settings.id, self.endpoint,
                 self.config.path, self.config.liveness_path)

    def ready(self) -> None:
        self._ready_since_ns = time.time_ns()

    def not_ready(self) -> None:
        self._ready_since_ns = None

    def _handle(self, request: Request) -> Response:
        answer = self._answer(request.path)
        if answer is None:
            answer = health.Answer(404, {"status": "Not found", "paths": [self.config.path, self.config.liveness_path]})
        return json_response(answer.code, answer.body)

    def _answer(self, path: str) -> health.Answer | None:
        statuses = self.settings.telemetry.statuses()
        if path == self.config.path:
            return health.readiness(statuses, self._ready_since_ns)
        if path == self.config.liveness_path:
            return health.liveness(statuses)
        return None

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
