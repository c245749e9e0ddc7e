"""A Kubernetes API server stand-in that speaks the real list/watch protocol over HTTP.

Tests drive the official ``kubernetes`` client (and flowtel's informers) against it, so
what is exercised is the client's real HTTP, chunked-stream and JSON handling, not a mock.
Semantics follow the API server (https://kubernetes.io/docs/reference/using-api/api-concepts/):

- one resourceVersion counter for everything, as etcd's revision: every write bumps it and
  stamps the object; a list carries the collection's resourceVersion;
- lists honour ``limit``/``continue`` with a consistent snapshot, ``labelSelector`` and
  ``fieldSelector`` (``spec.nodeName=…`` is what node-scoped informers send);
- ``?watch=true&resourceVersion=N`` streams JSON lines with chunked encoding: every change
  after N, ``ADDED``/``MODIFIED``/``DELETED`` (an object moving in or out of a selector is an
  ``ADDED``/``DELETED``, as the watch cache does), ``BOOKMARK`` events with
  ``allowWatchBookmarks``, and ``timeoutSeconds``; without N (or N=0) the current objects come
  first as ``ADDED``;
- history is bounded: a watch from a resourceVersion older than what is kept gets an
  ``ERROR`` event with a 410 ``Expired`` status ("too old resource version"), as the real
  server answers, and so does a ``continue`` token whose snapshot is gone;
- custom resources (Cilium's ``cilium.io/v2`` CiliumNetworkPolicy and
  CiliumClusterwideNetworkPolicy, as the CRDs define them) are served at
  ``/apis/cilium.io/v2/…`` with the same semantics, as the real server serves CRDs, so the
  client's ``CustomObjectsApi`` works against it;
- the server can be stopped and started again on the same port (its store survives, as etcd
  does), optionally with its history compacted and resourceVersions moved on, and every
  watch can be cut off abruptly (no terminating chunk).

Hooks for tests: :meth:`create`, :meth:`update`, :meth:`patch`, :meth:`delete`,
:meth:`compact`, :meth:`drop_watches`, :meth:`fail_next`, :meth:`restart`, plus the log of
requests in :attr:`requests`.
"""
from __future__ import annotations

import copy
import itertools
import json
import queue
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from tests.kubeapi.selectors import Requirement, SelectorError, matches, parse_field_selector, parse_label_selector


@dataclass(frozen=True, slots=True)
class Resource:
    name: str  # plural, as in the URL
    prefix: str  # "/api/v1" or "/apis/GROUP/VERSION"
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return "v1" if self.prefix == "/api/v1" else self.prefix.removeprefix("/apis/")


RESOURCES: dict[str, Resource] = {
    r.name: r
    for r in (
        Resource("pods", "/api/v1", "Pod", True),
        Resource("services", "/api/v1", "Service", True),
        Resource("endpoints", "/api/v1", "Endpoints", True),
        Resource("nodes", "/api/v1", "Node", False),
        Resource("namespaces", "/api/v1", "Namespace", False),
        Resource("replicasets", "/apis/apps/v1", "ReplicaSet", True),
        Resource("jobs", "/apis/batch/v1", "Job", True),
        Resource("endpointslices", "/apis/discovery.k8s.io/v1", "EndpointSlice", True),
        # Custom resources (Cilium's CRDs) are served like built-in ones, at /apis/GROUP/VERSION.
        Resource("ciliumnetworkpolicies", "/apis/cilium.io/v2", "CiliumNetworkPolicy", True),
        Resource("ciliumclusterwidenetworkpolicies", "/apis/cilium.io/v2", "CiliumClusterwideNetworkPolicy", False),
    )
}
_PREFIXES = sorted({r.prefix for r in RESOURCES.values()}, key=len, reverse=True)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    watch: bool


@dataclass(slots=True)
class _Event:
    rv: int
    resource: str
    type: str  # ADDED | MODIFIED | DELETED
    old: dict[str, Any] | None
    new: dict[str, Any]


@dataclass(eq=False, slots=True)
class _Watch:
    resource: str
    namespace: str | None
    labels: tuple[Requirement, ...]
    fields: tuple[Requirement, ...]
    sock: socket.socket
    events: queue.SimpleQueue[_Event] = field(default_factory=queue.SimpleQueue)
    closed: bool = False

    def selects(self, obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return matches(obj, self.labels, self.fields)


def rfc3339(seconds: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if seconds is None else seconds))


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: "FakeApiServer"

    def setup(self) -> None:
        super().setup()
        self.api._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.api._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        try:
            self.api._handle(self)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True


class FakeApiServer:
    """A threaded HTTP(S) server with the API's list/watch semantics; see the module docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        tls: tuple[str, str] | None = None,
        history_limit: int = 100_000,
        bookmark_interval: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.tls = tls  # (certfile, keyfile)
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self.requests: list[RequestRecord] = []
        self._lock = threading.RLock()
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {name: {} for name in RESOURCES}
        self._rv = 1
        self._compacted = 0  # a watch from a resourceVersion below this has missed events: 410
        self._history: deque[_Event] = deque()
        self._watches: set[_Watch] = set()
        self._conns: set[socket.socket] = set()
        self._snapshots: dict[str, tuple[list[dict[str, Any]], int]] = {}
        self._snapshot_ids = itertools.count(1)
        self._failures: dict[str, deque[tuple[int, bool | None]]] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> "FakeApiServer":
        handler = type("Handler", (_Handler,), {"api": self})
        httpd = ThreadingHTTPServer((self.host, self.port), handler)
        httpd.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-kube-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection, as a crashed API server would."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            for w in self._watches:
                w.closed = True
            conns = list(self._conns)
        for sock in conns:
            _shutdown(sock)
        if self._thread is not None:
            self._thread.join(5)

    def restart(self, *, new_resource_versions: bool = False, downtime: float = 0.0) -> None:
        """Stop and start on the same port. With ``new_resource_versions`` the history is gone
        and resourceVersions jump ahead, so every client's next watch gets 410 and must relist."""
        self.stop()
        if downtime:
            time.sleep(downtime)
        if new_resource_versions:
            with self._lock:
                self._rv += 1000
                self._history.clear()
                self._compacted = self._rv
                self._snapshots.clear()
        self.start()

    def __enter__(self) -> "FakeApiServer":
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test hooks -----------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def create(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        res = RESOURCES[resource]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (meta.get("namespace", ""), meta["name"])
        with self._lock:
            if key in self._objects[resource]:
                raise KeyError(f"{resource} {key} already exists")
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", rfc3339())
            obj["kind"], obj["apiVersion"] = res.kind, res.api_version
            self._commit(resource, key, "ADDED", None, obj)
        return copy.deepcopy(obj)

    def get(self, resource: str, name: str, namespace: str = "default") -> dict[str, Any]:
        key = (namespace if RESOURCES[resource].namespaced else "", name)
        with self._lock:
            return copy.deepcopy(self._objects[resource][key])

    def update(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        res = RESOURCES[resource]
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        key = (meta.get("namespace", "default") if res.namespaced else "", meta["name"])
        with self._lock:
            old = self._objects[resource][key]
            for kept in ("uid", "creationTimestamp", "namespace"):
                if kept in old["metadata"]:
                    meta.setdefault(kept, old["metadata"][kept])
            obj["kind"], obj["apiVersion"] = res.kind, res.api_version
            self._commit(resource, key, "MODIFIED", old, obj)
        return copy.deepcopy(obj)

    def patch(self, resource: str, name: str, change: Callable[[dict[str, Any]], None], namespace: str = "default") -> dict[str, Any]:
        with self._lock:
            obj = self.get(resource, name, namespace)
            change(obj)
            return self.update(resource, obj)

    def delete(self, resource: str, name: str, namespace: str = "default") -> None:
        key = (namespace if RESOURCES[resource].namespaced else "", name)
        with self._lock:
            old = self._objects[resource][key]
            final = copy.deepcopy(old)
            self._commit(resource, key, "DELETED", old, final)

    def compact(self) -> None:
        """Forget the history: watches from any earlier resourceVersion now get 410."""
        with self._lock:
            self._history.clear()
            self._compacted = self._rv
            self._snapshots.clear()

    def drop_watches(self) -> None:
        """Cut every open watch mid-stream, without the terminating chunk."""
        with self._lock:
            watches = list(self._watches)
            for w in watches:
                w.closed = True
        for w in watches:
            _shutdown(w.sock)

    def fail_next(self, resource: str, status: int, *, times: int = 1, watch: bool | None = None) -> None:
        """Answer the next ``times`` requests for ``resource`` with ``status`` (lists, watches or both)."""
        with self._lock:
            q = self._failures.setdefault(resource, deque())
            q.extend([(status, watch)] * times)

    def watch_count(self, resource: str) -> int:
        with self._lock:
            return sum(1 for w in self._watches if w.resource == resource and not w.closed)

    def wait_for_watch(self, resource: str, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.watch_count(resource) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {count} open watch(es) on {resource} within {timeout} s")
            time.sleep(0.01)

    def write_kubeconfig(self, path: str, *, token: str | None = None, ca_file: str | None = None) -> str:
        cluster: dict[str, Any] = {"server": self.url}
        if ca_file:
            cluster["certificate-authority"] = ca_file
        user: dict[str, Any] = {"token": token} if token else {}
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        with open(path, "w") as f:
            json.dump(doc, f)  # JSON is YAML: any kubeconfig reader takes it
        return path

    # --- internals ------------------------------------------------------------------------

    def _commit(self, resource: str, key: tuple[str, str], kind: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        if kind == "DELETED":
            del self._objects[resource][key]
        else:
            self._objects[resource][key] = new
        event = _Event(self._rv, resource, kind, old, new)
        self._history.append(event)
        while len(self._history) > self.history_limit:
            self._compacted = self._history.popleft().rv
        for w in self._watches:
            if w.resource == resource:
                w.events.put(event)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.discard(sock)

    def _route(self, path: str) -> tuple[Resource, str | None, str | None] | None:
        for prefix in _PREFIXES:
            if not path.startswith(prefix + "/"):
                continue
            parts = [p for p in path[len(prefix) + 1:].split("/") if p]
            if len(parts) >= 3 and parts[0] == "namespaces":
                ns, name = parts[1], (parts[3] if len(parts) == 4 else None)
                res = RESOURCES.get(parts[2])
                if res is None or res.prefix != prefix or not res.namespaced or len(parts) > 4:
                    return None
                return res, ns, name
            if 1 <= len(parts) <= 2:
                res = RESOURCES.get(parts[0])
                if res is None or res.prefix != prefix:
                    return None
                if len(parts) == 2 and res.namespaced:
                    return None
                return res, None, parts[1] if len(parts) == 2 else None
        return None

    def _handle(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        watch = query.get("watch") in ("true", "1")
        with self._lock:
            self.requests.append(RequestRecord("GET", url.path, query, watch))
        if self.token is not None:
            scheme, _, value = h.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or value.strip() != self.token:
                self._send_json(h, 401, _status(401, "Unauthorized", "Unauthorized"))
                return
        if url.path == "/version":
            self._send_json(h, 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-flowtel-fake",
                                     "platform": "linux/amd64"})
            return
        route = self._route(url.path)
        if route is None:
            self._send_json(h, 404, _status(404, "NotFound", f"the server could not find the requested resource ({url.path})"))
            return
        res, ns, name = route
        with self._lock:
            failures = self._failures.get(res.name)
            if failures and (failures[0][1] is None or failures[0][1] == watch):
                code, _ = failures.popleft()
                failure: int | None = code
            else:
                failure = None
        if failure is not None:
            reason = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 500: "InternalError",
                      503: "ServiceUnavailable"}.get(failure, "Failure")
            self._send_json(h, failure, _status(failure, reason, f"injected failure {failure} for {res.name}"))
            return
        if name is not None:
            key = (ns or "", name) if res.namespaced else ("", name)
            with self._lock:
                obj = self._objects[res.name].get(key)
            if obj is None:
                self._send_json(h, 404, _status(404, "NotFound", f'{res.name} "{name}" not found'))
            else:
                self._send_json(h, 200, obj)
            return
        try:
            labels = parse_label_selector(query.get("labelSelector"))
            fields = parse_field_selector(query.get("fieldSelector"))
        except SelectorError as exc:
            self._send_json(h, 400, _status(400, "BadRequest", str(exc)))
            return
        if watch:
            self._serve_watch(h, res, ns, labels, fields, query)
        else:
            self._serve_list(h, res, ns, labels, fields, query)

    def _send_json(self, h: _Handler, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _serve_list(self, h: _Handler, res: Resource, ns: str | None, labels: tuple[Requirement, ...],
                    fields: tuple[Requirement, ...], query: dict[str, str]) -> None:
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        with self._lock:
            if token:
                snap_id, _, start_text = token.partition(":")
                snap = self._snapshots.get(snap_id)
                if snap is None:
                    self._send_json(h, 410, _status(
                        410, "Expired",
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter."))
                    return
                items, rv = snap
                start = int(start_text)
            else:
                items = [obj for (obj_ns, _), obj in sorted(self._objects[res.name].items())
                         if (ns is None or obj_ns == ns) and matches(obj, labels, fields)]
                rv = self._rv
                start = 0
                snap_id = ""
            page = items[start:start + limit] if limit else items[start:]
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if limit and start + limit < len(items):
                if not snap_id:
                    snap_id = str(next(self._snapshot_ids))
                    self._snapshots[snap_id] = (items, rv)
                    while len(self._snapshots) > 64:
                        self._snapshots.pop(next(iter(self._snapshots)))
                meta["continue"] = f"{snap_id}:{start + limit}"
                meta["remainingItemCount"] = len(items) - start - limit
            elif snap_id:
                self._snapshots.pop(snap_id, None)
        # Stored objects are never changed in place (writes replace them), so this is safe unlocked.
        self._send_json(h, 200, {"kind": f"{res.kind}List", "apiVersion": res.api_version,
                                 "metadata": meta, "items": page})

    def _serve_watch(self, h: _Handler, res: Resource, ns: str | None, labels: tuple[Requirement, ...],
                     fields: tuple[Requirement, ...], query: dict[str, str]) -> None:
        rv_text = query.get("resourceVersion") or ""
        timeout = float(query.get("timeoutSeconds") or 0)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        w = _Watch(res.name, ns, labels, fields, h.connection)
        lines: list[bytes] = []
        gone = ""
        with self._lock:
            if rv_text in ("", "0"):
                for (obj_ns, _), obj in sorted(self._objects[res.name].items()):
                    if w.selects(obj):
                        lines.append(_line("ADDED", obj))
            else:
                try:
                    start_rv = int(rv_text)
                except ValueError:
                    self._send_json(h, 400, _status(400, "BadRequest", f"invalid resourceVersion {rv_text!r}"))
                    return
                if start_rv < self._compacted:
                    gone = f"too old resource version: {start_rv} ({self._compacted})"
                else:
                    for event in self._history:
                        if event.resource == res.name and event.rv > start_rv:
                            w.events.put(event)
            if not gone:
                self._watches.add(w)
        try:
            h.close_connection = True
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.send_header("Connection", "close")
            h.end_headers()
            if gone:
                _chunk(h, json.dumps({"type": "ERROR", "object": _status(410, "Expired", gone)}).encode() + b"\n")
                _chunk(h, b"")
                return
            for line in lines:
                _chunk(h, line)
            deadline = time.monotonic() + timeout if timeout else None
            last_bookmark = time.monotonic()
            while not w.closed:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait = 0.1
                if deadline is not None:
                    wait = min(wait, deadline - now)
                try:
                    event = w.events.get(timeout=max(wait, 0.001))
                except queue.Empty:
                    if bookmarks and time.monotonic() - last_bookmark >= self.bookmark_interval:
                        with self._lock:
                            mark = None if not w.events.empty() else self._rv
                        if mark is not None:
                            _chunk(h, json.dumps({"type": "BOOKMARK", "object": {
                                "kind": res.kind, "apiVersion": res.api_version,
                                "metadata": {"resourceVersion": str(mark)}}}).encode() + b"\n")
                            last_bookmark = time.monotonic()
                    continue
                line = _event_line(w, event)
                if line is not None and not w.closed:
                    _chunk(h, line)
            if not w.closed:
                _chunk(h, b"")
        finally:
            with self._lock:
                self._watches.discard(w)


def _event_line(w: _Watch, event: _Event) -> bytes | None:
    was, now = w.selects(event.old), w.selects(event.new)
    if event.type == "ADDED":
        return _line("ADDED", event.new) if now else None
    if event.type == "DELETED":
        return _line("DELETED", event.new) if was or now else None
    if was and now:
        return _line("MODIFIED", event.new)
    if now:
        return _line("ADDED", event.new)
    if was:
        return _line("DELETED", event.new)
    return None


def _line(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def _chunk(h: BaseHTTPRequestHandler, data: bytes) -> None:
    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    h.wfile.flush()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
