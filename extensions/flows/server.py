"""The flow API's requests: ``GET /flows``, ``GET /map``, ``GET /healthz`` (and the UI's files).

Responses to ``/flows`` are JSON lines, one Hubble envelope each (``{"flow": …}`` or
``{"lost_events": …}``), exactly what ``hubble observe -o json`` and the file exporter
write. A follow response streams until the client leaves or the agent stops. The request
query is the ``flowtel observe`` command line: ``?last=20&follow=1&namespace=shop&not&port=53``
(filter parameters in order, ``not`` negating the next one).

This module is request handling only (parameters in, a :class:`Response` out); connections,
limits, Host/Origin checks and timeouts are :mod:`flowtel.lib.http`'s, and what the
answers contain is the hub's.
"""
from __future__ import annotations

import json
import mimetypes
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from extensions.flows.hub import FlowHub, Follower, Query, TooManyFollowers
from flowtel import hubble
from flowtel.flowfilter import FILTER_FLAGS, NOT_FLAG, FilterError, build_filters
from flowtel.hubble_parse import parse_time_arg
from flowtel.lib.http import HTTPError, Request, Response, ascii_int, ascii_only, bad_request, json_response
from flowtel.lib.http.request import parse_query as split_query
from flowtel.records import Record

_encode = json.JSONEncoder(separators=(",", ":")).encode
_QUERY_KEYS = ("last", "since", "until", "follow")
_TRUE = ("1", "true", "yes", "")
_FALSE = ("0", "false", "no")
POLL_SECONDS = 1.0  # how often an idle follow stream checks for shutdown or a gone client
MAX_LAST = 1_000_000  # no ring is larger (FlowsConfig.buffer_size)
MAX_FILTERS = 32  # filter parameters in one request
# Times as nanoseconds since the epoch fit an int64 (Hubble's Timestamp range, 0001-9999).
_MIN_NS, _MAX_NS = -62_135_596_800 * 10**9, 253_402_300_799 * 10**9
_STATIC_CSP = "default-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"

BadRequest = HTTPError  # what parse_query raises (a 400); kept for callers of this module


def parse_time(name: str, value: str, now_ns: int) -> int:
    ascii_only(name, value)
    if len(value) > 64:
        raise bad_request(f"{name}: expected an RFC 3339 time or a duration such as 5m, got {value[:64]!r}…")
    try:
        ns = parse_time_arg(value, now_ns)
    except (ValueError, OverflowError) as exc:
        raise bad_request(f"{name}: {exc}") from None
    if not _MIN_NS <= ns <= _MAX_NS:
        raise bad_request(f"{name}: {value!r} is outside the years 0001-9999")
    return ns


def query_from_pairs(pairs: Sequence[tuple[str, str]], now_ns: int | None = None) -> Query:
    """A :class:`Query` from decoded ``/flows`` parameters; :class:`HTTPError` (400) names the problem."""
    now = time.time_ns() if now_ns is None else now_ns
    q = Query()
    filters: list[tuple[str, str]] = []
    for key, value in pairs:
        if key == "last":
            q.last = ascii_int("last", value, maximum=MAX_LAST)
        elif key == "since":
            q.since_ns = parse_time("since", value, now)
        elif key == "until":
            q.until_ns = parse_time("until", value, now)
        elif key == "follow":
            lowered = value.lower()
            if lowered not in _TRUE and lowered not in _FALSE:
                raise bad_request(f"follow: expected 1/true/yes or 0/false/no, got {value!r}")
            q.follow = lowered in _TRUE
        elif key == NOT_FLAG or key in FILTER_FLAGS:
            filters.append((key, value))
        else:
            raise bad_request(f"unknown parameter {key!r}; expected {', '.join(_QUERY_KEYS)}, not, or a filter: "
                              + ", ".join(FILTER_FLAGS))
    if len(filters) > MAX_FILTERS:
        raise bad_request(f"at most {MAX_FILTERS} filter parameters in one request, got {len(filters)}")
    if q.follow and q.until_ns is not None:
        raise bad_request("until cannot be combined with follow")
    try:
        q.filters = build_filters(filters)
    except FilterError as exc:
        raise bad_request(str(exc)) from None
    return q


def parse_query(raw: str, now_ns: int | None = None) -> Query:
    """A :class:`Query` from ``/flows``'s raw query string."""
    return query_from_pairs(split_query(raw), now_ns)


def _lines(records: list[Record]) -> bytes:
    if not records:
        return b""
    return ("\n".join(_encode(hubble.record_envelope(r)) for r in records) + "\n").encode()


class FlowAPI:
    """The handler of one server: ``hub``'s API at ``api_prefix`` (and with ``static_dir``,
    that folder's files at ``/``)."""

    def __init__(self, hub: FlowHub, *, api_prefix: str = "", static_dir: Path | None = None) -> None:
        self.hub = hub
        self.api_prefix = api_prefix
        self.static_dir = static_dir
        self.stopping = threading.Event()

    def __call__(self, request: Request) -> Response:
        path = request.path
        prefix = self.api_prefix
        if prefix and path.startswith(prefix + "/"):
            path = path[len(prefix):]
        elif prefix:
            return self._static(path)
        if path == "/flows":
            return self._flows(request)
        if path == "/map":
            for key, _ in request.query:
                if key != "namespace":
                    raise bad_request(f"unknown parameter {key!r}; /map takes namespace")
            return json_response(200, self.hub.service_map(request.values("namespace")))
        if path == "/healthz":
            if request.query:
                raise bad_request("/healthz takes no parameters")
            return json_response(200, self.hub.status())
        return json_response(404, {"error": f"no such path {path[:100]!r}; try /flows, /map or /healthz"})

    def _flows(self, request: Request) -> Response:
        q = query_from_pairs(request.query)
        if not q.follow:
            return Response(200, _lines(self.hub.query(q)), "application/x-ndjson")
        try:
            history, follower = self.hub.follow(q)
        except TooManyFollowers as exc:
            raise HTTPError(503, str(exc), {"Retry-After": "5"}) from None
        return Response(200, self._stream(history, follower, request), "application/x-ndjson")

    def _stream(self, history: list[Record], follower: Follower, request: Request) -> Iterator[bytes]:
        hub = self.hub
        try:
            yield _lines(history)
            while not self.stopping.is_set():
                records, lost, closed = follower.take(POLL_SECONDS)
                if lost:
                    records.insert(0, hub.lost_record(lost))
                if records:
                    yield _lines(records)
                elif closed or request.client_gone():
                    return
        finally:
            hub.unfollow(follower)

    def _static(self, path: str) -> Response:
        root = self.static_dir
        if root is None:
            return json_response(404, {"error": "not found"})
        name = "index.html" if path in ("", "/") else path.lstrip("/")
        file = (root / name).resolve()
        # Only files inside the packaged asset folder: no path walks out of it.
        if root.resolve() not in file.parents or not file.is_file():
            return json_response(404, {"error": f"no such file {path[:100]!r}"})
        data = file.read_bytes()
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "text/javascript"):
            ctype += "; charset=utf-8"
        return Response(200, data, ctype, {
            "Cache-Control": "no-cache",
            "Content-Security-Policy": _STATIC_CSP,
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
        })
