"""The flow store behind Hubble's Observer API: a bounded ring of ``GetFlowsResponse``
messages and follow streams with bounded per-reader queues.

``add`` runs on the pipeline worker that feeds the ``hubble`` extension and never waits
for a reader: a follower that does not keep up loses flows from its own queue, counted,
and is told how many in a ``lost_events`` response (source ``HUBBLE_RING_BUFFER``, as
Hubble reports a reader that fell behind its ring) right after the flows it kept.

Records are kept as they come and turned into their Cilium message only when a reader
needs it (``convert``; the record keeps its wire form once built): the pipeline pays a deque append,
not an encoding, for flows nobody asks for; ``--last 20`` encodes about 20.

Selection is Hubble's ``GetFlows``: the last ``number`` matching flows (the first, with
``first``) between ``since`` and ``until``; ``number`` 0 without ``follow`` means all of
them, and a ``number`` larger than the ring is the whole ring. Filters are
:mod:`flowtel.lib.hubble.filters`, the only implementation.
"""
from __future__ import annotations

import operator
import threading
import time
from collections import deque
from itertools import repeat
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Iterable, Sequence

from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.lib.hubble.filters import Filters
from flowtel.records import FLOW_FIELDS, Flow

GetFlowsResponse = observer_pb2.GetFlowsResponse
NAMESPACE_TTL_NS = 3600 * 10**9  # Hubble forgets a namespace not seen in flows for an hour


@dataclass(frozen=True, slots=True)
class Query:
    """A validated ``GetFlowsRequest``; times are wall-clock nanoseconds."""

    filters: Filters = field(default_factory=Filters)
    number: int | None = None  # None: every matching flow
    first: bool = False
    since_ns: int | None = None
    until_ns: int | None = None
    follow: bool = False


def response_time_ns(resp: GetFlowsResponse) -> int:
    if resp.WhichOneof("response_types") == "flow" and resp.flow.HasField("time"):
        return resp.flow.time.ToNanoseconds()
    return resp.time.ToNanoseconds()


def _in_window(t: int, q: Query) -> bool:
    return (q.since_ns is None or t >= q.since_ns) and (q.until_ns is None or t <= q.until_ns)


# One ring slot: (the arrival's wall-clock ns, what arrived, its message when it arrived as
# one). A plain tuple: a batch's slots are made by C calls (zip), not a constructor per flow.
_Entry = tuple[int, Any, "GetFlowsResponse | None"]
_T: Final = 0
_ITEM: Final = 1
_RESP: Final = 2


Convert = Callable[[Any], GetFlowsResponse]


def _message(e: _Entry, convert: Convert | None) -> GetFlowsResponse:
    resp = e[_RESP]
    if resp is not None:
        return resp
    assert convert is not None
    # Not kept here: the record keeps its own wire form (convert's memo), so a later read
    # is a cheap copy and the ring does not hold every message twice.
    return convert(e[_ITEM])


def _wanted(e: _Entry, q: Query, convert: Convert | None) -> bool:
    if not _in_window(e[_T], q):
        return False
    return q.filters.empty or q.filters.matches(_message(e, convert))


class Follower:
    """One follow stream: a bounded queue filled by the store, drained by the reader."""

    def __init__(self, query: Query, capacity: int, convert: Convert | None = None) -> None:
        self.query = query
        self.capacity = capacity
        self._convert = convert
        self.lost = 0  # flows dropped from this queue and not yet reported to the reader
        self._queue: deque[GetFlowsResponse] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def offer(self, batch: Sequence[_Entry]) -> int:
        """Queue what the reader asked for; returns how many it lost. Takes only this
        follower's own short lock, never waits for the reader."""
        wanted = [_message(e, self._convert) for e in batch if _wanted(e, self.query, self._convert)]
        if not wanted:
            return 0
        with self._cond:
            room = max(self.capacity - len(self._queue), 0)
            # Keep the oldest: the reader sees a contiguous stretch, then the report of the
            # gap, which reads as "N flows missing here".
            self._queue.extend(wanted[:room])
            lost = len(wanted) - min(room, len(wanted))
            self.lost += lost
            self._cond.notify()
        return lost

    def take(self, timeout: float) -> tuple[list[GetFlowsResponse], int, bool]:
        """``(responses, lost since the last take, closed)``; waits up to ``timeout``."""
        with self._cond:
            if not self._queue and not self.lost and not self._closed:
                self._cond.wait(timeout)
            out = list(self._queue)
            self._queue.clear()
            lost, self.lost = self.lost, 0
            return out, lost, self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class TooManyFollowers(Exception):
    """More follow streams than the store allows; the server answers RESOURCE_EXHAUSTED."""


class FlowStore:
    def __init__(self, *, node_name: str, capacity: int, follower_capacity: int, max_followers: int,
                 convert: Convert | None = None, time_of: Callable[[Any], int] | None = None) -> None:
        """``add`` takes GetFlowsResponse messages, or with ``convert`` (and ``time_of``, the
        item's wall-clock ns) anything ``convert`` turns into one when it is first read."""
        self._convert = convert
        self._time_of = time_of if time_of is not None else response_time_ns
        self.node_name = node_name
        self.capacity = capacity
        self.follower_capacity = follower_capacity
        self.max_followers = max_followers
        self.started_ns = time.monotonic_ns()
        self._ring: deque[_Entry] = deque(maxlen=capacity)
        self._followers: list[Follower] = []
        self._lock = threading.Lock()
        self._seen = 0
        self._lost_to_followers = 0
        self._namespaces: dict[tuple[str, str], int] = {}
        self._rate: deque[tuple[int, int]] = deque()  # (second, flows added in it)

    # --- writing ---------------------------------------------------------------------

    def add(self, items: Iterable[Any]) -> int:
        """Add flows (and lost-events notices); returns how many follower slots were lost."""
        items = items if isinstance(items, list) else list(items)
        if not items:
            return 0
        lost = 0
        now_s = int(time.monotonic())
        now_ns = time.time_ns()
        # Ring append and follower hand-off under one lock, so a follower registering
        # concurrently gets each flow exactly once: in its history or in its stream.
        with self._lock:
            # Without a follower only the ring's last ``capacity`` entries can outlive this call:
            # an interval of 10⁴–10⁵ flows would make (and at once drop) an entry for each.
            kept = items if self._followers or len(items) <= self.capacity else items[-self.capacity:]
            times = map(self._time_of, kept)
            batch: list[_Entry] = list(zip(times, kept, kept if self._convert is None else repeat(None)))
            self._ring.extend(batch)
            self._seen += len(items)
            for follower in self._followers:
                lost += follower.offer(batch)
            self._lost_to_followers += lost
            if self._rate and self._rate[-1][0] == now_s:
                self._rate[-1] = (now_s, self._rate[-1][1] + len(items))
            else:
                self._rate.append((now_s, len(items)))
            while self._rate and self._rate[0][0] < now_s - 60:
                self._rate.popleft()
            # Once per distinct endpoint of the batch, of every flow (those the ring does not
            # keep were seen too): enrichment shares one object per pod, so a batch of
            # thousands of flows names a few hundred (keyed by id: their own hash walks every
            # field; the batch holds them, so the ids are theirs meanwhile). The common batch,
            # all flows, is read by C calls (map, zip) rather than a loop per record.
            if {*map(type, items)} == _FLOWS_ONLY:
                sources = list(map(_source_of, items))
                destinations = list(map(_destination_of, items))
                ends: dict[int, Any] = dict(zip(map(id, sources), sources))
                ends.update(zip(map(id, destinations), destinations))
                ends.pop(id(None), None)
            else:
                ends = {}
                for item in items:
                    for ep in _endpoints(item):
                        ends[id(ep)] = ep
            namespaces = self._namespaces
            for ep in ends.values():
                if ep.namespace:
                    namespaces[(ep.cluster_name, ep.namespace)] = now_ns
        return lost

    # --- reading ---------------------------------------------------------------------

    def _snapshot(self) -> list[_Entry]:
        with self._lock:
            return list(self._ring)

    def select(self, ring: Sequence[_Entry], q: Query) -> list[GetFlowsResponse]:
        if q.number == 0:
            return []
        out: list[GetFlowsResponse] = []
        convert = self._convert
        items = ring if q.first or q.number is None else reversed(ring)
        for e in items:
            if _wanted(e, q, convert):
                out.append(_message(e, convert))
                if q.number is not None and len(out) >= q.number:
                    break
        if not (q.first or q.number is None):
            out.reverse()
        return out

    def query(self, q: Query) -> list[GetFlowsResponse]:
        return self.select(self._snapshot(), q)

    def follow(self, q: Query) -> tuple[list[GetFlowsResponse], Follower]:
        """History (as :meth:`query`; none when ``number`` is 0) and a follower registered
        atomically with it."""
        follower = Follower(Query(q.filters, None, False, q.since_ns, q.until_ns, True), self.follower_capacity,
                            self._convert)
        with self._lock:
            if len(self._followers) >= self.max_followers:
                raise TooManyFollowers(
                    f"{self.max_followers} follow streams are open (extensions.hubble.max_followers)")
            ring = list(self._ring) if q.number != 0 else []
            self._followers.append(follower)
        return self.select(ring, q), follower

    def unfollow(self, follower: Follower) -> None:
        with self._lock:
            if follower in self._followers:
                self._followers.remove(follower)
        follower.close()

    def lost_response(self, count: int) -> GetFlowsResponse:
        resp = GetFlowsResponse(node_name=self.node_name)
        resp.time.GetCurrentTime()
        resp.lost_events.source = flow_pb2.HUBBLE_RING_BUFFER
        resp.lost_events.num_events_lost = count
        return resp

    # --- status ----------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        with self._lock:
            now_s = int(time.monotonic())
            recent = sum(n for s, n in self._rate if s >= now_s - 60)
            window = min(60.0, max((time.monotonic_ns() - self.started_ns) / 1e9, 1.0))
            return {
                "num_flows": len(self._ring),
                "max_flows": self.capacity,
                "seen_flows": self._seen,
                "uptime_ns": time.monotonic_ns() - self.started_ns,
                "flows_rate": recent / window,
                "followers": len(self._followers),
                "follower_flows_lost": self._lost_to_followers,
            }

    def namespaces(self) -> list[tuple[str, str]]:
        """``(cluster, namespace)`` of flows seen in the last hour, sorted."""
        cutoff = time.time_ns() - NAMESPACE_TTL_NS
        with self._lock:
            for key in [k for k, t in self._namespaces.items() if t < cutoff]:
                del self._namespaces[key]
            return sorted(self._namespaces)

    def close(self) -> None:
        with self._lock:
            followers, self._followers = self._followers, []
        for follower in followers:
            follower.close()


_FLOWS_ONLY = {Flow}
_source_of = operator.itemgetter(FLOW_FIELDS.index("source"))
_destination_of = operator.itemgetter(FLOW_FIELDS.index("destination"))


def _endpoints(item: Any) -> tuple[Any, ...]:
    """Both ends of a flow, as a record (``source``/``destination``) or a message."""
    if isinstance(item, GetFlowsResponse):
        if item.WhichOneof("response_types") != "flow":
            return ()
        return item.flow.source, item.flow.destination
    if not hasattr(item, "destination"):  # a lost-events record (its ``source`` is a name)
        return ()
    return tuple(ep for ep in (item.source, item.destination) if ep is not None)
