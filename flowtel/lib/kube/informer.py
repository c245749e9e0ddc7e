"""List-then-watch of one resource kind, keeping a store of stripped objects current.

This is client-go's reflector, on the official Python client's API calls:

1. list, in pages of ``page_size`` (a consistent snapshot through ``continue``), strip every
   object, and reconcile the store with it: what is new is added, what changed is updated,
   what is missing was deleted while nobody watched;
2. watch from the list's resourceVersion with bookmarks, applying each event and moving
   the resourceVersion on (bookmarks move it on with no object, so a reconnect after a
   quiet hour does not fall off the server's history);
3. when the server ends the watch (``timeoutSeconds``), watch again from where it ended;
   when the stream breaks or the server is unreachable, wait with exponential backoff and
   jitter, then watch again from the same resourceVersion: nothing is missed if the server
   still has that history;
4. when the server says the resourceVersion is too old (410 Gone, as an ``ERROR`` event or
   an HTTP status), list again and reconcile.

Watch events are parsed here, line by line, rather than by ``kubernetes.watch.Watch``: that
class builds a full client model of every object (the expensive part, and then thrown away
by stripping) and retries a 410 itself, which hides the relist this loop must count.
"""
from __future__ import annotations

import json
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, Protocol, TypeVar

from kubernetes.client import ApiException
from kubernetes.watch.watch import iter_resp_lines

from flowtel.lib.kube.health import ApiHealth


T = TypeVar("T")


class Keyed(Protocol):
    @property
    def key(self) -> str: ...


K = TypeVar("K", bound=Keyed)
T_contra = TypeVar("T_contra", contravariant=True)


class Handler(Protocol[T_contra]):
    def on_add(self, obj: T_contra) -> None: ...

    def on_update(self, old: T_contra, new: T_contra) -> None: ...

    def on_delete(self, obj: T_contra) -> None: ...


@dataclass(frozen=True, slots=True)
class WatchOptions:
    request_timeout: float  # connect and read timeout of lists; connect timeout of watches
    watch_timeout: float  # the server ends each watch after this long (timeoutSeconds)
    page_size: int
    backoff_initial: float
    backoff_max: float


class Backoff:
    """Exponential backoff with ±20 % jitter, so informers of many agents do not reconnect in step."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self._attempt = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * (2 ** self._attempt))
        self._attempt = min(self._attempt + 1, 62)
        return float(delay * random.uniform(0.8, 1.2))

    def reset(self) -> None:
        self._attempt = 0


class ResourceVersionTooOld(Exception):
    """410 Gone: the server no longer has the history after our resourceVersion."""


class Informer(Generic[K]):
    """One resource kind's store and the thread keeping it current."""

    def __init__(
        self,
        name: str,
        lister: Callable[..., Any],
        strip: Callable[[Mapping[str, Any]], K | None],
        handler: Handler[K],
        options: WatchOptions,
        *,
        health: ApiHealth,
        count: Callable[[str, int], None],
        list_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self._lister = lister
        self._strip = strip
        self._handler = handler
        self._opts = options
        self._health = health
        self._count = count
        self._kwargs = dict(list_kwargs or {})
        self.store: dict[str, K] = {}
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._backoff = Backoff(options.backoff_initial, options.backoff_max)
        self._response: Any = None
        self._listed = False
        self._events_since_list = 0
        self._thread = threading.Thread(target=self._run, name=f"flowtel-k8s-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Tell the thread to stop and cut the request it is blocked in; returns at once."""
        self._stop.set()
        _interrupt(self._response)

    def join(self, timeout: float = 5.0) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)

    # --- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        need_list = True
        watched = False
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                    watched = False
                if watched:
                    self._count("watch_restarts", 1)
                watched = True
                self._watch()
            except ResourceVersionTooOld as exc:
                self._health.logger.info("%s: %s: %s; listing again", self._health.component, self.name, exc)
                need_list = True
                if self._events_since_list == 0 and self._listed:
                    # 410 again right after a list: the server is unsettled; do not hammer it.
                    self._stop.wait(self._backoff.next())
            except Exception as exc:  # the API server is down, slow, or refusing: retry, never die
                if self._stop.is_set():
                    return
                self._count("api_errors", 1)
                self._health.failed(self.name, exc)
                self._stop.wait(self._backoff.next())

    def _list(self) -> None:
        items: dict[str, K] = {}
        resource_version: str | None = None
        token: str | None = None
        while True:
            kwargs = dict(self._kwargs, limit=self._opts.page_size, _preload_content=False,
                          _request_timeout=self._opts.request_timeout)
            if token:
                kwargs["_continue"] = token
            try:
                body = self._request(kwargs)
            except ApiException as exc:
                if exc.status == 410:  # the continue token's snapshot expired: start over
                    raise ResourceVersionTooOld(f"list snapshot expired ({exc.reason})") from None
                raise
            meta = body.get("metadata") or {}
            if resource_version is None:
                resource_version = meta.get("resourceVersion")
            for raw in body.get("items") or ():
                obj = self._strip(raw)
                if obj is not None:
                    items[obj.key] = obj
            token = meta.get("continue")
            if not token:
                break
        if self._listed:
            self._count("relists", 1)
        self._replace(items)
        self.resource_version = resource_version
        self._listed = True
        self._events_since_list = 0
        self._backoff.reset()
        self._health.succeeded(self.name)
        self.synced.set()

    def _request(self, kwargs: dict[str, Any]) -> Any:
        response = self._lister(**kwargs)
        self._response = response
        try:
            return json.loads(response.data)
        finally:
            self._response = None
            response.release_conn()

    def _replace(self, items: dict[str, K]) -> None:
        # In place, each change before its handler runs: handlers and readers on other
        # threads always see the store as of the last event they were told about.
        store = self.store
        handler = self._handler
        for key in [k for k in store if k not in items]:
            handler.on_delete(store.pop(key))
        for key, obj in items.items():
            prev = store.get(key)
            if prev is None:
                store[key] = obj
                handler.on_add(obj)
            elif prev != obj:
                store[key] = obj
                handler.on_update(prev, obj)

    def _watch(self) -> None:
        timeout = max(1, int(self._opts.watch_timeout))
        response = self._lister(
            **self._kwargs,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _preload_content=False,
            # The read timeout only catches a dead connection: the server ends the watch itself.
            _request_timeout=(self._opts.request_timeout, timeout + self._opts.request_timeout),
        )
        self._response = response
        try:
            if self._stop.is_set():
                return
            self._health.succeeded(self.name)
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    return
                if line:
                    self._apply(json.loads(line))
                    self._events_since_list += 1
                    self._backoff.reset()
        finally:
            self._response = None
            response.close()
            response.release_conn()

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        raw = event.get("object") or {}
        meta = raw.get("metadata") or {}
        if kind == "BOOKMARK":
            self.resource_version = meta.get("resourceVersion", self.resource_version)
            self._count("watch_bookmarks", 1)
            return
        if kind == "ERROR":
            code = raw.get("code")
            message = raw.get("message") or raw.get("reason") or "no message"
            if code == 410:
                raise ResourceVersionTooOld(message)
            raise ApiException(status=code or 0, reason=f"watch error: {message}")
        obj = self._strip(raw)
        key = obj.key if obj is not None else _raw_key(meta)
        if kind in ("ADDED", "MODIFIED"):
            prev = self.store.get(key)
            if obj is None:
                if prev is not None:
                    del self.store[key]
                    self._handler.on_delete(prev)
            elif prev is None:
                self.store[key] = obj
                self._handler.on_add(obj)
            elif prev != obj:
                self.store[key] = obj
                self._handler.on_update(prev, obj)
        elif kind == "DELETED":
            prev = self.store.pop(key, None)
            gone = prev if prev is not None else obj
            if gone is not None:
                self._handler.on_delete(gone)
        self.resource_version = meta.get("resourceVersion", self.resource_version)
        self._count("watch_events", 1)


def _raw_key(meta: Mapping[str, Any]) -> str:
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name', '')}" if ns else meta.get("name", "")


def _interrupt(response: Any) -> None:
    """Unblock a thread reading ``response``: shut its socket down (close() would wait on it)."""
    if response is None:
        return
    try:
        response.shutdown()  # urllib3 >= 2.3 keeps the socket's shutdown for exactly this
        return
    except (AttributeError, ValueError, RuntimeError, OSError):
        pass
    try:
        # Older urllib3: the connection's socket, unless http.client already let go of it
        # (a "Connection: close" response), in which case the read timeout ends the wait.
        sock = response.connection.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass


def wait_synced(informers: list[Informer[Any]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for informer in informers:
        if not informer.synced.wait(max(0.0, deadline - time.monotonic())):
            return False
    return True
