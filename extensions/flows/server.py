"""The flow API over HTTP: ``GET /flows``, ``GET /map``, ``GET /healthz``.

Responses to ``/flows`` are JSON lines, one Hubble envelope each (``{"flow": …}`` or
``{"lost_events": …}``), exactly what ``hubble observe -o json`` and the file exporter
write. A follow response stays open and streams; the server ends it at shutdown and
notices a client that went away within a second. The request query is the
``flowtel observe`` command line: ``?last=20&follow=1&namespace=shop&not&port=53``
(filter parameters in order, ``not`` negating the next one).
"""
from __future__ import annotations

import json
import logging
import mimetypes
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from extensions.flows.hub import FlowHub, Query, TooManyFollowers
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.lib.hubble.filters import FilterError, compile_filters
from flowtel.lib.hubble.flags import FILTER_FLAGS, NOT_FLAG, build_filters
from flowtel.lib.hubble.jsonlines import response_json
from flowtel.lib.hubble.parse import parse_time_arg

log = logging.getLogger("flowtel.extensions.flows")

_encode = json.JSONEncoder(separators=(",", ":")).encode
_QUERY_KEYS = ("last", "since", "until", "follow")
_TRUE = ("1", "true", "yes", "")
POLL_SECONDS = 1.0  # how often an idle follow stream checks for shutdown or a gone client


class BadRequest(Exception):
    pass


def parse_time(value: str, now_ns: int) -> int:
    try:
        return parse_time_arg(value, now_ns)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def parse_query(raw: str, now_ns: int | None = None) -> Query:
    """A :class:`Query` from ``/flows``'s query string; :class:`BadRequest` names the problem.
    Filters are hubble observe's flags, built into Cilium FlowFilters and compiled by the one
    filter implementation (flowtel.lib.hubble)."""
    now = time.time_ns() if now_ns is None else now_ns
    last: int | None = None
    since_ns = until_ns = None
    follow = False
    pairs: list[tuple[str, str]] = []
    for key, value in parse_qsl(raw, keep_blank_values=True):
        if key == "last":
            if not value.isdigit():
                raise BadRequest(f"last: expected a number of flows, got {value!r}")
            last = int(value)
        elif key == "since":
            since_ns = parse_time(value, now)
        elif key == "until":
            until_ns = parse_time(value, now)
        elif key == "follow":
            follow = value.lower() in _TRUE
        elif key == NOT_FLAG or key in FILTER_FLAGS:
            pairs.append((key, value))
        else:
            raise BadRequest(f"unknown parameter {key!r}; expected {', '.join(_QUERY_KEYS)}, not, or a filter: "
                             + ", ".join(FILTER_FLAGS))
    if follow and until_ns is not None:
        raise BadRequest("until cannot be combined with follow")
    try:
        filters = compile_filters(*build_filters(pairs))
    except FilterError as exc:
        raise BadRequest(str(exc)) from None
    # No `last` and no `since`: the whole ring, or with follow only new flows (as before).
    number = last if last is not None else (0 if follow and since_ns is None else None)
    return Query(filters, number, False, since_ns, until_ns, follow)


def _lines(responses: list[observer_pb2.GetFlowsResponse]) -> bytes:
    if not responses:
        return b""
    return ("\n".join(response_json(r) for r in responses) + "\n").encode()


class FlowHTTPServer(ThreadingHTTPServer):
    """Serves one hub; with ``static_dir`` also files under ``/`` and the API under ``api_prefix``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: FlowHub, *, api_prefix: str = "",
                 static_dir: Path | None = None) -> None:
        self.hub = hub
        self.api_prefix = api_prefix
        self.static_dir = static_dir
        self.stopping = threading.Event()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def serve_in_thread(self, name: str) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopping.set()
        self.hub.close()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FlowHTTPServer
    server_version = "flowtel"
    # HTTP/1.0: a streamed body ends when the server closes the connection, which every
    # client (curl, urllib, a browser's fetch) reads without chunked decoding.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        prefix = self.server.api_prefix
        if prefix and path.startswith(prefix + "/"):
            path = path[len(prefix):]
        elif prefix:
            self._static(path)
            return
        try:
            if path == "/flows":
                self._flows(url.query)
            elif path == "/map":
                namespaces = [v for k, v in parse_qsl(url.query) if k == "namespace"]
                self._json(HTTPStatus.OK, self.server.hub.service_map(namespaces))
            elif path == "/healthz":
                self._json(HTTPStatus.OK, self.server.hub.status())
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {path!r}; try /flows, /map or /healthz"})
        except BadRequest as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except TooManyFollowers as exc:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = (json.dumps(body, indent=None) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()

    def _flows(self, raw_query: str) -> None:
        hub = self.server.hub
        q = parse_query(raw_query)
        if not q.follow:
            body = _lines(hub.query(q))
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
            return
        history, follower = hub.follow(q)
        try:
            self._start_stream()
            self.wfile.write(_lines(history))
            while not self.server.stopping.is_set():
                records, lost, closed = follower.take(POLL_SECONDS)
                if lost:  # after the flows it kept, where the gap is (as GetFlows)
                    records.append(hub.lost_record(lost))
                if records:
                    self.wfile.write(_lines(records))
                elif closed or self._client_gone():
                    return
        finally:
            hub.unfollow(follower)

    def _client_gone(self) -> bool:
        # A follow client sends nothing after its request, so a readable socket means EOF
        # (or a reset): the only way to learn it left while no flows match its filter.
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _static(self, path: str) -> None:
        root = self.server.static_dir
        if root is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        name = "index.html" if path in ("", "/") else path.lstrip("/")
        file = (root / name).resolve()
        # Only files inside the packaged asset folder: no path walks out of it.
        if root.resolve() not in file.parents or not file.is_file():
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such file {path!r}"})
            return
        data = file.read_bytes()
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self'; img-src 'self' data:")
        self.end_headers()
        self.wfile.write(data)
