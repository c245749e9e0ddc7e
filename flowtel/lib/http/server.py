"""The agent's HTTP server: waitress with every limit set, and a handler contract on top.

Why waitress: one event loop holds every connection (an idle connection costs a channel
object, not a thread and its stack), requests run on a fixed pool of worker threads, and it
has the limits this needs built in and maintained upstream: a connection limit, idle
channel timeouts, request header and body size caps, bounded output buffers. What it lacks
is added here, in subclasses of its server and channel:

- a connection over the limit is answered ``503`` and closed at once (waitress would stop
  accepting and leave it waiting in the listen queue, unanswered);
- a read timeout: a request must arrive whole within ``read_timeout`` (waitress's idle
  timeout alone lets a client send one header byte every minute forever);
- client errors (malformed requests, refused hosts, bad parameters, resets, timeouts) are
  counted in the component's telemetry and logged at debug, never as tracebacks.

Handlers (``Callable[[Request], Response]``) see validated input only: GET and HEAD, a
path and query that are valid UTF-8 without control characters, bounded parameter
counts and sizes, and (for browser-facing servers) an acceptable Host and no cross-site
signal. Whatever a handler raises, the client gets a response.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from flowtel.component import Telemetry
from flowtel.lib.http.config import BrowserFacingSettings, HTTPServerSettings
from flowtel.lib.http.origin import HostPolicy
from flowtel.lib.http.request import HTTPError, Request, Response, parse_path, parse_query

log = logging.getLogger("flowtel.lib.http")
# waitress logs each client that leaves mid-response at INFO ("Client disconnected while
# serving"); those are counted (http_client_resets) instead. Its warnings still show.
logging.getLogger("waitress").setLevel(logging.WARNING)

Handler = Callable[[Request], Response]

# Counter names in the owning component's telemetry (flowtel_component_<name>{component=…}).
REJECTED_OVERLOAD = "http_connections_rejected"  # over max_connections: 503
TIMED_OUT = "http_connections_timed_out"  # read_timeout or idle_timeout
CLIENT_ERRORS = "http_client_errors"  # every 4xx: malformed, too large, bad parameter, refused host/origin
CLIENT_RESETS = "http_client_resets"  # the client went away mid-response
SERVER_ERRORS = "http_server_errors"  # a handler failed: 500 (logged with its traceback: a flowtel bug)
REQUESTS = "http_requests"

_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
_OVERLOAD_BODY = b'{"error":"too many connections to this server; retry later"}\n'
_OVERLOAD_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_OVERLOAD_BODY)).encode() + b"\r\n\r\n" + _OVERLOAD_BODY
)


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 64
    read_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_request_header_bytes: int = 16_384
    max_request_body_bytes: int = 65_536
    # Worker threads: requests served at once. A streaming handler holds one for as long as
    # it streams, so a server with streams needs one per allowed stream and a few more.
    threads: int = 4
    # A slow reader blocks its own worker once this much output waits for it.
    max_pending_output_bytes: int = 1 << 20

    @classmethod
    def from_settings(cls, settings: HTTPServerSettings, *, threads: int = 4) -> Limits:
        return cls(max_connections=settings.max_connections, read_timeout=settings.read_timeout,
                   idle_timeout=settings.idle_timeout, max_request_header_bytes=settings.max_request_header_bytes,
                   threads=threads)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status, (json.dumps(body, separators=(",", ":")) + "\n").encode(), "application/json",
                    headers or {})


class _Channel(HTTPChannel):
    server: _Server
    _request_started = 0.0

    def received(self, data: bytes) -> bool:
        if self.request is None and data:
            self._request_started = time.monotonic()
        return bool(super().received(data))

    def handle_read(self) -> None:
        try:
            data = self.recv(self.adj.recv_bytes)
        except OSError:
            self.server.count(CLIENT_RESETS)
            self.handle_close()
            return
        if data:
            self.last_activity = time.time()
            self.received(data)
        else:
            self.connected = False

    def service(self) -> None:
        request = self.requests[0] if self.requests else None
        if request is not None and request.error:
            # waitress answers these itself (400, 413, 431) with a plain-text body.
            self.server.count(CLIENT_ERRORS)
            log.debug("%s: %s from %s", self.server.component, request.error.reason, self.addr)
            if not hasattr(request, "path"):
                # waitress logs a client that leaves while its error answer is written with
                # task.request.path, which a request that failed to parse never got: the
                # AttributeError then escapes as a traceback per such client.
                request.path = ""
        super().service()

    def handle_error(self) -> None:  # an exception in the event loop for this channel
        self.server.count(CLIENT_RESETS)
        log.debug("%s: connection from %s failed", self.server.component, self.addr, exc_info=True)
        self.handle_close()


class _Server(TcpWSGIServer):
    channel_class = _Channel

    def __init__(self, app: Callable[..., Any], *, component: str, telemetry: Telemetry, limits: Limits,
                 host: str, port: int) -> None:
        self.component = component
        self.telemetry = telemetry
        self.limits = limits
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__(
            app,
            map={},
            host=host,
            port=port,
            ipv4=family == socket.AF_INET,
            ipv6=family == socket.AF_INET6,
            sockinfo=(family, socket.SOCK_STREAM, 0, (host, port)),
            # waitress counts the listener and its trigger in the limit it never enforces
            # here: this class answers over-limit connections itself (handle_accept).
            connection_limit=limits.max_connections + 1_000_000,
            channel_timeout=max(1, int(limits.idle_timeout)),
            cleanup_interval=1,
            max_request_header_size=limits.max_request_header_bytes,
            max_request_body_size=limits.max_request_body_bytes,
            threads=limits.threads,
            outbuf_high_watermark=limits.max_pending_output_bytes,
            outbuf_overflow=limits.max_pending_output_bytes,
            inbuf_overflow=limits.max_request_body_bytes,
            # One request may be read ahead while a response streams: the client's EOF is
            # then seen at once (a follow stream with nothing to send learns it left).
            channel_request_lookahead=1,
            asyncore_use_poll=True,  # select() fails beyond fd 1024
            asyncore_loop_timeout=1,
            log_socket_errors=False,
            expose_tracebacks=False,
            ident="flowtel",
            clear_untrusted_proxy_headers=False,
            url_scheme="http",
        )

    def count(self, name: str, n: int = 1) -> None:
        self.telemetry.add(self.component, name, n)

    def handle_accept(self) -> None:
        try:
            pair = self.accept()
        except OSError:
            return
        if pair is None:
            return
        conn, addr = pair
        if len(self.active_channels) >= self.limits.max_connections:
            self.count(REJECTED_OVERLOAD)
            _refuse(conn)
            return
        try:
            self.set_socket_options(conn)
        except OSError:
            conn.close()
            return
        self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)

    def maintenance(self, now: float) -> None:
        idle_cutoff = now - self.adj.channel_timeout
        read_cutoff = time.monotonic() - self.limits.read_timeout
        for channel in list(self.active_channels.values()):
            if channel.will_close or channel.requests:
                continue
            if channel.request is not None and channel._request_started < read_cutoff:
                # Part of a request, and not all of it in read_timeout: slow or stalled sender.
                self.count(TIMED_OUT)
                channel.will_close = True
            elif channel.request is None and channel.last_activity < idle_cutoff:
                self.count(TIMED_OUT)
                channel.will_close = True

    def handle_error(self) -> None:
        log.debug("%s: accept loop error", self.component, exc_info=True)


def _refuse(conn: socket.socket) -> None:
    """Answer 503 on a connection over the limit without keeping it: non-blocking, once."""
    try:
        conn.setblocking(False)
        try:
            conn.recv(65536)  # what already arrived, so that closing sends FIN, not RST
        except OSError:
            pass
        conn.send(_OVERLOAD_RESPONSE)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


class BoundedHTTPServer:
    """One listening socket, served by waitress in a thread of its own, with ``handler``
    behind the checks described in the module docstring."""

    def __init__(
        self,
        *,
        component: str,
        telemetry: Telemetry,
        host: str,
        port: int,
        handler: Handler,
        limits: Limits,
        browser: BrowserFacingSettings | None = None,
    ) -> None:
        self.component = component
        self.telemetry = telemetry
        self.handler = handler
        self.host_policy = HostPolicy(host, browser.allowed_hosts) if browser is not None else None
        self._server = _Server(self._wsgi, component=component, telemetry=telemetry, limits=limits,
                               host=host, port=port)
        self._thread: threading.Thread | None = None
        self.stopping = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def endpoint(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection, then wait for the workers."""
        self.stopping.set()
        server = self._server
        done = threading.Event()

        def close_all() -> None:
            for channel in list(server._map.values()):
                if channel is not server.trigger:
                    try:
                        channel.close()
                    except OSError:
                        pass
            try:
                server.trigger.close()
            except OSError:
                pass
            done.set()

        if self._thread is not None and self._thread.is_alive():
            try:
                server.trigger.pull_trigger(close_all)
            except OSError:
                # The loop was already running the queued thunks (a worker woke it) and ran
                # ours too, closing the trigger before our wake-up byte: nothing to wake.
                pass
            done.wait(timeout)
            self._thread.join(timeout)
        if not done.is_set():
            close_all()
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout)

    # -- WSGI ------------------------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.telemetry.add(self.component, REQUESTS)
        try:
            response = self._respond(environ)
        except HTTPError as exc:
            log.debug("%s: %d %s", self.component, exc.status, exc.message)
            response = json_response(exc.status, {"error": exc.message}, exc.headers)
        except Exception:
            self.telemetry.add(self.component, SERVER_ERRORS)
            log.exception("%s: serving %s failed", self.component, environ.get("PATH_INFO", "?")[:200])
            response = json_response(500, {"error": "internal error; see the agent's log"})
        if 400 <= response.status < 500:
            self.telemetry.add(self.component, CLIENT_ERRORS)
        merged = {"Content-Type": response.content_type, "Cache-Control": "no-store",
                  "X-Content-Type-Options": "nosniff", **response.headers}
        headers = list(merged.items())
        body = response.body
        if isinstance(body, (bytes, bytearray)):
            headers.append(("Content-Length", str(len(body))))
            start_response(f"{response.status} {_REASONS.get(response.status, 'Status')}", headers)
            return [] if environ["REQUEST_METHOD"] == "HEAD" else [bytes(body)]
        write = start_response(f"{response.status} {_REASONS.get(response.status, 'Status')}", headers)
        if environ["REQUEST_METHOD"] == "HEAD":
            close = getattr(body, "close", None)
            if close is not None:
                close()
            return []
        # The status line and headers now, not with the first data (waitress, like PEP 3333,
        # holds them until a non-empty chunk): a follow client learns at once that its
        # request was taken, even when nothing matches for a long time.
        write(b"")
        return self._stream(body)

    def _stream(self, body: Iterable[bytes]) -> Iterator[bytes]:
        try:
            yield from body
        except GeneratorExit:
            # waitress closes the iterator when the client went away (ClientDisconnected).
            self.telemetry.add(self.component, CLIENT_RESETS)
            raise
        except Exception:
            # The status line is out: all that is left is to end the stream.
            self.telemetry.add(self.component, SERVER_ERRORS)
            log.exception("%s: a streamed response failed", self.component)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def _respond(self, environ: dict[str, Any]) -> Response:
        method = environ["REQUEST_METHOD"]
        if method not in ("GET", "HEAD"):
            raise HTTPError(405, f"method {method[:20]} not allowed; this server answers GET and HEAD",
                            {"Allow": "GET, HEAD"})
        headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
                   if key.startswith("HTTP_")}
        if "CONTENT_LENGTH" in environ and environ["CONTENT_LENGTH"] not in ("", "0"):
            raise HTTPError(400, "a GET request has no body here")
        if self.host_policy is not None:
            refusal = self.host_policy.refusal(headers)
            if refusal is not None:
                raise HTTPError(403, refusal)
        channel_gone = environ.get("waitress.client_disconnected")
        request = Request(
            method=method,
            path=parse_path(environ.get("PATH_INFO", "") or "/"),
            query=parse_query(environ.get("QUERY_STRING", "")),
            headers=headers,
            client_gone=channel_gone if callable(channel_gone) else (lambda: False),
        )
        return self.handler(request)


def bind_error_remedy(component: str, endpoint: str, port: int) -> str:
    return (f"set extensions.{component}.endpoint (or the exporter's endpoint) to a free HOST:PORT, or stop what "
            f"holds it (`ss -ltnp 'sport = :{port}'` shows it; another flowtel agent on this node?)")
