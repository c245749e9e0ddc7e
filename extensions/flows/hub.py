"""The flow hub: Hubble's observer for one node. A ring of recent records, follow streams
with bounded per-client queues, and the service graph, fed by every tapped batch.

``add`` runs on the extension's pipeline worker and never waits for a client: a follower
that does not keep up loses records from its own queue, counted, and is told how many in
a ``lost_events`` record before the next flows it gets (Hubble reports a reader that fell
behind the ring the same way, with source ``HUBBLE_RING_BUFFER``).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from flowtel.component import Telemetry
from flowtel.flowfilter import Filters
from flowtel.records import LostEvents, Record
from flowtel.servicegraph import ServiceGraph, graph_to_dict

LOST_SOURCE_SLOW_CLIENT = "HUBBLE_RING_BUFFER"


@dataclass(slots=True)
class Query:
    """What a client asked for (``GET /flows``); times are wall-clock nanoseconds."""

    filters: Filters = field(default_factory=Filters)
    last: int | None = None  # the newest N matching records; None: all that match
    since_ns: int | None = None
    until_ns: int | None = None
    follow: bool = False


def _in_window(record: Record, q: Query) -> bool:
    t = record.time_ns
    return (q.since_ns is None or t >= q.since_ns) and (q.until_ns is None or t <= q.until_ns)


class Follower:
    """One follow stream: a bounded queue filled by the hub, drained by the client's thread."""

    def __init__(self, query: Query, capacity: int) -> None:
        self.query = query
        self.capacity = capacity
        self.lost = 0  # records dropped from this queue and not yet reported to the client
        self._queue: deque[Record] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def offer(self, batch: Sequence[Record]) -> int:
        """Queue what the client asked for; returns how many records it lost. Never blocks
        for the client: only this follower's own short lock is taken."""
        q = self.query
        wanted = [r for r in batch if q.filters.matches(r) and _in_window(r, q)]
        if not wanted:
            return 0
        with self._cond:
            room = self.capacity - len(self._queue)
            if room >= len(wanted):
                self._queue.extend(wanted)
                lost = 0
            else:
                # Keep the oldest: the client sees a contiguous stretch, then the gap, then
                # the report, which reads as "N records missing here".
                self._queue.extend(wanted[:max(room, 0)])
                lost = len(wanted) - max(room, 0)
                self.lost += lost
            self._cond.notify()
        return lost

    def take(self, timeout: float) -> tuple[list[Record], int, bool]:
        """``(records, lost since the last take, closed)``; waits up to ``timeout`` for any."""
        with self._cond:
            if not self._queue and not self.lost and not self._closed:
                self._cond.wait(timeout)
            records = list(self._queue)
            self._queue.clear()
            lost, self.lost = self.lost, 0
            return records, lost, self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class TooManyFollowers(Exception):
    pass


class FlowHub:
    def __init__(
        self,
        *,
        owner: str,
        node_name: str,
        telemetry: Telemetry,
        buffer_size: int,
        client_buffer_size: int,
        max_followers: int,
        graph: ServiceGraph,
    ) -> None:
        self.owner = owner
        self.node_name = node_name
        self.client_buffer_size = client_buffer_size
        self.max_followers = max_followers
        self.graph = graph
        self._telemetry = telemetry
        self._ring: deque[Record] = deque(maxlen=buffer_size)
        self._followers: list[Follower] = []
        self._lock = threading.Lock()
        self._seen = 0
        telemetry.register_gauge(owner, "ring_size", lambda: len(self._ring))
        telemetry.register_gauge(owner, "followers", lambda: len(self._followers))

    def add(self, batch: Sequence[Record]) -> None:
        if not batch:
            return
        lost = 0
        # Ring append and follower hand-off under one lock, so a follower registering
        # concurrently gets each record exactly once: in its history or in its stream.
        with self._lock:
            self._ring.extend(batch)
            self._seen += len(batch)
            for follower in self._followers:
                lost += follower.offer(batch)
        self._telemetry.add(self.owner, "records_in", len(batch))
        self._telemetry.add(self.owner, "follower_records_lost", lost)
        self.graph.add(batch)

    def query(self, q: Query) -> list[Record]:
        with self._lock:
            ring = list(self._ring)
        return self._select(ring, q)

    @staticmethod
    def _select(ring: list[Record], q: Query) -> list[Record]:
        if q.last is not None:
            out: list[Record] = []
            if q.last == 0:
                return out
            for record in reversed(ring):
                if _in_window(record, q) and q.filters.matches(record):
                    out.append(record)
                    if len(out) >= q.last:
                        break
            out.reverse()
            return out
        return [r for r in ring if _in_window(r, q) and q.filters.matches(r)]

    def follow(self, q: Query) -> tuple[list[Record], Follower]:
        """History (``last``/``since`` as in :meth:`query`, none when neither is given) and a
        follower registered atomically with it."""
        follower = Follower(Query(q.filters, None, q.since_ns, None, True), self.client_buffer_size)
        with self._lock:
            if len(self._followers) >= self.max_followers:
                raise TooManyFollowers(f"{self.max_followers} follow streams are open (max_followers)")
            ring = list(self._ring) if (q.last is not None or q.since_ns is not None) else []
            self._followers.append(follower)
        return self._select(ring, q), follower

    def unfollow(self, follower: Follower) -> None:
        with self._lock:
            if follower in self._followers:
                self._followers.remove(follower)
        follower.close()

    def lost_record(self, count: int) -> LostEvents:
        return LostEvents(time.time_ns(), LOST_SOURCE_SLOW_CLIENT, count, self.node_name)

    def service_map(self, namespaces: Sequence[str] = ()) -> dict[str, Any]:
        self.graph.expire()
        return graph_to_dict(self.graph.snapshot(), namespaces=namespaces, overflow=self.graph.overflow)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "status": "ok",
                "node_name": self.node_name,
                "ring_size": len(self._ring),
                "ring_capacity": self._ring.maxlen,
                "records_seen": self._seen,
                "followers": len(self._followers),
            }

    def close(self) -> None:
        with self._lock:
            followers, self._followers = self._followers, []
        for follower in followers:
            follower.close()
