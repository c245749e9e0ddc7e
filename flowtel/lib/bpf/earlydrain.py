"""When to drain a double buffer before its interval ends, and draining while the pipeline is slow.

A map that fills within an interval (a connection-rate workload in the tc flow maps, a flood of
drops from new source ports in the drop map) is drained early: its fill is one per-CPU counter
read (:meth:`DoubleBuffer.fill`, ~10 µs), read every ``FILL_POLL_S``, and past ``drain_at_fill``
of the map the buffers swap. At most ``max_early_drains`` of those per interval, so that a pod
creating keys as fast as it can buys a bounded number of records (then the LRU evicts, counted).

The fill must be read during the whole drain, not only between drains: a drain hands its entries
on a chunk at a time, each once the pipeline consumed the previous one, and that wait may last
``DRAIN_WAIT_SHARE`` of an interval, while the other buffer takes every new key. So
:class:`Drain` hands on what one :meth:`DoubleBuffer.take` removed and, between chunks and every
``FILL_POLL_S`` of each wait, asks :class:`EarlyDrain` whether the active buffer is due; if so it
takes again at once (the previous take's entries are a copy, so the second flip loses and
duplicates nothing) and hands that take on after the current one. Used by the ebpf receiver's
flow maps and kernel_events' drop and connection flow maps: one owner of the policy.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Generic, TypeVar

from flowtel.lib.bpf.doublebuffer import DRAIN_WAIT_SHARE, DoubleBuffer, Taken

# How often the active map's fill is read: 5 reads a second cost the idle agent ~50 µs/s, and
# bound what a map can gain between two reads (creation rate x FILL_POLL_S).
FILL_POLL_S = 0.2

T = TypeVar("T")
R = TypeVar("R")


def check_drain_at_fill(value: float) -> float:
    """The rule every ``drain_at_fill`` config key follows (0: off; else a share of the map from
    0.05, a drain every few entries below it, to 0.9, leaving room for what arrives between two
    fill reads): for the config validators of the maps' owners."""
    if value and not 0.05 <= value <= 0.9:
        raise ValueError("drain_at_fill must be 0 (off) or between 0.05 and 0.9")
    return value


class EarlyDrain:
    """The early-drain budget of one double buffer: ``due()`` is true (and spends one of the
    interval's ``max_early_drains``) once the active map holds ``drain_at_fill`` of its entries;
    ``new_interval()`` at each scheduled drain. ``drain_at_fill`` 0: never due."""

    def __init__(self, buffer: DoubleBuffer[Any], drain_at_fill: float, max_early_drains: int) -> None:
        self._buffer = buffer
        self.threshold = int(drain_at_fill * buffer.max_entries)
        self.budget = max_early_drains
        self.used = 0  # early drains in the current interval

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def new_interval(self) -> None:
        self.used = 0

    def due(self) -> bool:
        if not self.threshold or self.used >= self.budget or self._buffer.fill() < self.threshold:
            return False
        self.used += 1
        return True


class Drain(Generic[T, R]):
    """One drain of ``buffer``: its take and any early takes it needed while handing on.

    ``decode`` turns a chunk of entries into records; ``hand_on`` gives them to the pipeline;
    ``wait(timeout)`` waits until the pipeline consumed what it was handed (True) or the timeout
    ran out (False: the rest is handed on at once and the queues' bounds apply, counted).
    ``early``: the buffer's :class:`EarlyDrain`, watched during the drain (None for a final
    drain, with the programs detached). ``on_early`` is told of each early take.
    Each take's deadline is ``DRAIN_WAIT_SHARE`` of ``interval`` from the start of its hand-on.
    """

    def __init__(self, buffer: DoubleBuffer[T], interval: float, decode: Callable[[list[T]], list[R]],
                 hand_on: Callable[[list[R]], None], wait: Callable[[float], bool], *,
                 early: EarlyDrain | None = None, on_early: Callable[[], None] = lambda: None,
                 chunk: int) -> None:
        self._buffer = buffer
        self._interval = interval
        self._decode = decode
        self._hand_on = hand_on
        self._wait = wait
        self._early = early
        self._on_early = on_early
        self._chunk = chunk
        self._takes: deque[Taken[T]] = deque()
        self.handed = 0  # records handed on
        self.waits_timed_out = 0
        # Entries the LRU dropped before the takes, summed as each take is made: the caller
        # reports it whatever happens to the hand-on (an exception must not hide a loss).
        self.evicted = 0
        self.abandoned = 0  # entries of takes never handed on because the hand-on raised

    def run(self, *, writers_stopped: bool = False) -> None:
        """Take and hand on: the first take, then the early ones in order. On an exception the
        takes not yet handed on are counted in ``abandoned`` (their entries are out of the
        kernel) and the exception goes on; ``evicted`` is complete either way."""
        self._take(writers_stopped)
        if writers_stopped:
            self._early = None  # nothing writes the maps: nothing to watch
        try:
            while self._takes:
                self._hand_on_all(self._takes[0])
                self._takes.popleft()
        except BaseException:
            self.abandoned = sum(t.entries for t in list(self._takes)[1:])
            self._takes.clear()
            raise

    def _take(self, writers_stopped: bool = False) -> None:
        taken = self._buffer.take(writers_stopped=writers_stopped)
        self.evicted += taken.evicted
        self._takes.append(taken)

    def _watch(self) -> None:
        if self._early is not None and self._early.due():
            self._on_early()
            self._take()

    def _hand_on_all(self, taken: Taken[T]) -> None:
        deadline = time.monotonic() + self._interval * DRAIN_WAIT_SHARE
        handed = 0
        for entries in taken.chunks(self._chunk):
            records = self._decode(entries)
            del entries[:]  # the raw entries of this chunk are not needed once decoded
            if not records:
                continue
            self._watch()
            # The previous chunk first goes through the pipeline: one chunk in flight, one being
            # built; a drain of one chunk never waits.
            if handed and deadline > time.monotonic() and not self._wait_watching(deadline):
                self.waits_timed_out += 1
            handed += len(records)
            self._hand_on(records)
        self.handed += handed

    def _wait_watching(self, deadline: float) -> bool:
        """``wait`` until ``deadline``, in slices of FILL_POLL_S with the fill read between them."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._wait(min(left, FILL_POLL_S)):
                return True
            self._watch()
