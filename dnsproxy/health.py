"""The proxy's liveness and readiness over HTTP, for the kubelet's probes.

``GET /healthz`` (liveness): 200 while the proxy's loop keeps turning; 503 when it has not
completed a round for ``stall_after_s`` (a wedged process, which a restart fixes: enforcement
is pinned in the kernel and survives it).
``GET /readyz`` (readiness): 200 once the proxy answers DNS with a complete policy view (in
``--kube`` mode: after every informer listed once); 503 before. An API server that goes away
later does not make the proxy unready: it keeps enforcing what it knows, which the body says.

Both answer a JSON body with the details, so ``curl`` on the node explains a failing probe.
This is deliberately a separate small server from the Prometheus metrics endpoint: probes
must answer even when metrics rendering is slow, and they bind to loopback only by default.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

from dnsproxy.bounded import BoundedHandler, BoundedHTTPServer, ServerLimits
from dnsproxy.supervise import Supervisor

log = logging.getLogger("flowtel.dnsproxy")

Check = Callable[[], tuple[bool, dict[str, Any]]]
# Beside the proxy's metrics (9967); clear of the agent's (9965, 13133) and the Collector
# sidecar's (13134) ports, which share the node's network namespace with it.
DEFAULT_HEALTH_PORT = 9968
# The kubelet opens one connection per probe; a few scripts may poll too. Anything beyond is
# refused at once, and a slow client is cut after 5 s.
HEALTH_LIMITS = ServerLimits(max_connections=32, max_per_client=16, idle_timeout_s=5.0, request_timeout_s=5.0)


class HealthServer:
    """Serves each path's check: (healthy, details) -> 200 or 503 with the details as JSON."""

    def __init__(self, host: str, port: int, checks: dict[str, Check], limits: ServerLimits = HEALTH_LIMITS) -> None:
        self.checks = checks
        server = self

        class Handler(BoundedHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                check = server.checks.get(self.path.split("?", 1)[0])
                if check is None:
                    self._send(404, {"error": f"no such path; try {', '.join(sorted(server.checks))}"})
                    return
                try:
                    ok, details = check()
                except Exception as exc:  # a failing check is an unhealthy answer, not a dead server
                    ok, details = False, {"error": f"{type(exc).__name__}: {exc}"}
                self._send(200 if ok else 503, {"status": "ok" if ok else "unavailable", **details})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, sort_keys=True).encode() + b"\n"
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = BoundedHTTPServer("health", (host, port), Handler, limits)
        self.counters = self._httpd.counters
        self.address: tuple[str, int] = self._httpd.server_address[:2]  # type: ignore[assignment]
        self._thread: threading.Thread | None = None

    def start(self, supervisor: Supervisor | None = None) -> None:
        if supervisor is not None:
            self._thread = supervisor.start("dnsproxy-health", self._httpd.serve_forever, poll_interval=0.2)
        else:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name="dnsproxy-health", daemon=True)
            self._thread.start()
        log.info("health endpoint on http://%s:%d (/healthz, /readyz)", *self.address)

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
