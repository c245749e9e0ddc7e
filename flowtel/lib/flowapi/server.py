"""The flow API's requests: ``GET /flows``, ``GET /map``, ``GET /healthz`` (and the UI's files).

Responses to ``/flows`` are JSON lines, one Cilium ``GetFlowsResponse`` each (``{"flow": …}``
or ``{"lost_events": …}``) in its proto3 JSON form, what ``hubble observe -o json`` and the
file exporter write; selection and filters are the hubble extension's (flowtel.lib.hubble). A follow response streams until the client leaves or the agent stops. The request
query is the ``flowtel observe`` command line: ``?last=20&follow=1&namespace=shop&not&port=53``
(filter parameters in order, ``not`` negating the next one).

This module is request handling only (parameters in, a :class:`Response` out); connections,
limits, Host/Origin checks and timeouts are :mod:`flowtel.lib.http`'s, and what the
answers contain is the hub's.
"""
from __future__ import annotations

import mimetypes
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from flowtel.lib.flowapi.hub import FlowHub, Follower, Query, TooManyFollowers
from flowtel.lib.http import HTTPError, Request, Response, ascii_int, ascii_only, bad_request, json_response
from flowtel.lib.http.request import parse_query as split_query
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.lib.hubble.filters import FilterError, compile_filters
from flowtel.lib.hubble.flags import FILTER_FLAGS, NOT_FLAG, build_filters
from flowtel.lib.hubble.jsonlines import response_json
from flowtel.lib.hubble.parse import parse_time_arg

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
    last: int | None = None
    since_ns = until_ns = None
    follow = False
    filters: list[tuple[str, str]] = []
    for key, value in pairs:
        if key == "last":
            last = ascii_int("last", value, maximum=MAX_LAST)
        elif key == "since":
            since_ns = parse_time("since", value, now)
        elif key == "until":
            until_ns = parse_time("until", value, now)
        elif key == "follow":
            lowered = value.lower()
            if lowered not in _TRUE and lowered not in _FALSE:
                raise bad_request(f"follow: expected 1/true/yes or 0/false/no, got {value!r}")
            follow = lowered in _TRUE
        elif key == NOT_FLAG or key in FILTER_FLAGS:
            filters.append((key, value))
        else:
            raise bad_request(f"unknown parameter {key!r}; expected {', '.join(_QUERY_KEYS)}, not, or a filter: "
                              + ", ".join(FILTER_FLAGS))
    if len(filters) > MAX_FILTERS:
        raise bad_request(f"at most {MAX_FILTERS} filter parameters in one request, got {len(filters)}")
    if follow and until_ns is not None:
        raise bad_request("until cannot be combined with follow")
    try:
        # hubble observe's flags as Cilium FlowFilters, compiled by the one implementation.
        compiled = compile_filters(*build_filters(filters))
    except FilterError as exc:
        raise bad_request(str(exc)) from None
    # No `last` and no `since`: the whole ring, or with follow only new flows.
    number = last if last is not None else (0 if follow and since_ns is None else None)
    return Query(compiled, number, False, since_ns, until_ns, follow)


def parse_query(raw: str, now_ns: int | None = None) -> Query:
    """A :class:`Query` from ``/flows``'s raw query string."""
    return query_from_pairs(split_query(raw), now_ns)


def _lines(responses: list[observer_pb2.GetFlowsResponse]) -> bytes:
    if not responses:
        return b""
    return ("\n".join(response_json(r) for r in responses) + "\n").encode()


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

    def _stream(self, history: list[observer_pb2.GetFlowsResponse], follower: Follower,
                request: Request) -> Iterator[bytes]:
        hub = self.hub
        try:
            yield _lines(history)
            while not self.stopping.is_set():
                records, lost, closed = follower.take(POLL_SECONDS)
                if lost:  # after the flows it kept, where the gap is (as GetFlows)
                    records.append(hub.lost_record(lost))
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
