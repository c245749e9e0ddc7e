"""Matching DNS responses to the requests they answer, with a timeout and a bounded table.

Pure logic over timestamps (no clock of its own), so tests drive it with synthetic times.
The caller chooses the key; the receiver uses one per observation point and exchange:
``(ifindex, client addr, client port, server addr, server port, protocol, DNS id)``, so
the same packet seen on two interfaces forms two exchanges and nothing is counted twice.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

T = TypeVar("T")


class AddResult(enum.Enum):
    ADDED = "added"
    DUPLICATE = "duplicate"  # the key is pending already (a retransmission): the first is kept
    FULL = "full"  # the table is at its bound: the request is not tracked


@dataclass(slots=True)
class Pending(Generic[T]):
    ts_ns: int
    item: T


class PendingTable(Generic[T]):
    """Requests waiting for a response, in arrival order, at most ``max_pending`` of them.

    A retransmitted request (same key while pending) keeps the first one, so the latency of
    the eventual response is what the client waited in total. A response later than
    ``timeout_ns`` matches nothing: its request is unanswered, as :meth:`expire` reports.
    """

    def __init__(self, timeout_ns: int, max_pending: int) -> None:
        if timeout_ns <= 0 or max_pending <= 0:
            raise ValueError("timeout_ns and max_pending must be positive")
        self.timeout_ns = timeout_ns
        self.max_pending = max_pending
        # dicts keep insertion order: the oldest request is always first.
        self._pending: dict[Hashable, Pending[T]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: Hashable, ts_ns: int, item: T) -> AddResult:
        if key in self._pending:
            return AddResult.DUPLICATE
        if len(self._pending) >= self.max_pending:
            return AddResult.FULL
        self._pending[key] = Pending(ts_ns, item)
        return AddResult.ADDED

    def take(self, key: Hashable, ts_ns: int) -> Pending[T] | None:
        """The request a response at ``ts_ns`` answers, removed from the table; or None."""
        pending = self._pending.get(key)
        if pending is None or ts_ns - pending.ts_ns >= self.timeout_ns:
            return None  # a late response leaves its request to expire() as unanswered
        del self._pending[key]
        return pending

    def expire(self, now_ns: int) -> list[Pending[T]]:
        """Remove and return the requests that got no response by ``now_ns``, oldest first."""
        out: list[Pending[T]] = []
        deadline = now_ns - self.timeout_ns
        pending = self._pending
        # Events from different CPUs reach user space nearly, not strictly, in time order:
        # stopping at the first young entry can leave an older one behind it for one more
        # call, never reports anything early.
        while pending:
            key = next(iter(pending))
            entry = pending[key]
            if entry.ts_ns > deadline:
                break
            del pending[key]
            out.append(entry)
        return out

    def clear(self) -> int:
        """Forget every pending request (shutdown); returns how many there were."""
        n = len(self._pending)
        self._pending.clear()
        return n
