"""Bounds for every TCP and HTTP server of the proxy: connection caps, deadlines, counted errors.

A pod (or anything that reaches the node) can open connections and then send nothing, or a
byte a second. Each server here therefore:

- caps concurrent connections, in total and per client address (a slot is a thread): beyond
  the cap a new connection is closed at once and counted (``rejected``);
- gives every connection a deadline: a read that waits past its deadline ends the
  connection (``timeout``), and a whole request (HTTP) or message (DNS over TCP) must arrive
  within its own deadline, however slowly it drips;
- counts what clients do to it (``reset``, ``timeout``, ``error``) instead of printing a
  traceback per connection (socketserver's default), logging at most one line per interval.

Counters are read by /metrics (``flowtel_dnsproxy_server_*``).
"""
from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("flowtel.dnsproxy")

CLIENT_ERROR_KINDS = ("rejected", "reset", "timeout", "error")
_LOG_INTERVAL_S = 60.0


@dataclass
class ServerLimits:
    max_connections: int
    max_per_client: int
    idle_timeout_s: float  # waiting for the next request (or message) on an open connection
    request_timeout_s: float  # from a request's (message's) first byte to its last


@dataclass
class ServerCounters:
    """One server's client errors by kind and its open connections, updated under ``lock``."""

    name: str
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in CLIENT_ERROR_KINDS})
    open: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _next_log: float = 0.0

    def count(self, kind: str, detail: str = "") -> None:
        now = time.monotonic()
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            due = now >= self._next_log
            if due:
                self._next_log = now + _LOG_INTERVAL_S
        if due and kind in ("rejected", "error"):
            log.warning("%s server: %s connection%s (counted in flowtel_dnsproxy_server_client_errors_total; "
                        "at most one such line a minute)", self.name, kind, f": {detail}" if detail else "")


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, EOFError)):
        return "reset"
    return "error"


class BoundedThreadingMixIn(socketserver.ThreadingMixIn):
    # Mixed into a socketserver.BaseServer subclass, which provides this.
    shutdown_request: Any

    """A thread per connection, at most ``limits.max_connections`` of them (and
    ``max_per_client`` per client address); errors counted, not printed."""

    daemon_threads = True
    limits: ServerLimits
    counters: ServerCounters

    def init_bounds(self, name: str, limits: ServerLimits) -> None:
        self.limits = limits
        self.counters = ServerCounters(name)
        self._per_client: dict[str, int] = {}
        self._bounds_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0]) if isinstance(client_address, tuple) else ""
        with self._bounds_lock:
            over = (self.counters.open >= self.limits.max_connections
                    or self._per_client.get(client, 0) >= self.limits.max_per_client)
            if not over:
                self.counters.open += 1
                self._per_client[client] = self._per_client.get(client, 0) + 1
        if over:
            self.counters.count("rejected", f"{client}: at the cap ({self.limits.max_connections} in all, "
                                            f"{self.limits.max_per_client} per client)")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread for it: give the slot back
            self._release(client)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0]) if isinstance(client_address, tuple) else ""
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._release(client)

    def _release(self, client: str) -> None:
        with self._bounds_lock:
            self.counters.open -= 1
            left = self._per_client.get(client, 1) - 1
            if left:
                self._per_client[client] = left
            else:
                self._per_client.pop(client, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        kind = error_kind(exc) if exc is not None else "error"
        self.counters.count(kind, f"{type(exc).__name__}: {exc}" if exc is not None else "")


def request_deadline(sock: socket.socket, seconds: float) -> threading.Timer:
    """Shut ``sock`` down after ``seconds`` unless cancelled: bounds a whole HTTP request
    however slowly its bytes arrive (each read also has its own timeout)."""

    def cut() -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    return timer


from http.server import BaseHTTPRequestHandler, HTTPServer  # noqa: E402 - the HTTP half of this module


class BoundedHTTPServer(BoundedThreadingMixIn, HTTPServer):
    """An HTTP server with the bounds above; its handler must derive from :class:`BoundedHandler`."""

    def __init__(self, name: str, address: tuple[str, int], handler: type[BoundedHandler], limits: ServerLimits) -> None:
        self.init_bounds(name, limits)
        super().__init__(address, handler)


class BoundedHandler(BaseHTTPRequestHandler):
    """Reads time out after the server's idle timeout; a connection lives at most its request
    timeout; client errors are counted on the server, never printed."""

    server: BoundedHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout_s  # type: ignore[misc] # StreamRequestHandler sets it on the socket
        super().setup()
        self._deadline = request_deadline(self.connection, self.server.limits.request_timeout_s)

    def finish(self) -> None:
        self._deadline.cancel()
        try:
            super().finish()
        except OSError:  # the peer is gone: nothing left to flush
            pass

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        timed_out = any(isinstance(a, (TimeoutError, socket.timeout)) for a in args)
        self.server.counters.count("timeout" if timed_out else "error", format % args if args else format)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # probes and scrapes every few seconds: no line per request
