"""The drain's scheduling without a kernel: a stand-in buffer with the DoubleBuffer contract
(take() removes what the active buffer holds; fill() counts what it gained since).

Checked: an early take made while a drain waits for the pipeline is handed on after the first,
each entry exactly once; the budget bounds early takes across drains until a new interval; an
exception in the hand-on still reports every take's evictions and counts the takes it abandoned.
The real maps are tested in receiver/ebpf/test_drain_watches_fill.py and
receiver/ebpf/kernel_events/test_drop_early_drain.py.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from flowtel.lib.bpf.earlydrain import Drain, EarlyDrain, check_drain_at_fill


class _Taken:
    def __init__(self, entries: list[int], evicted: int) -> None:
        self._entries: list[int] | None = entries
        self.entries = len(entries)
        self.evicted = evicted

    def chunks(self, chunk: int) -> Iterator[list[int]]:
        entries, self._entries = self._entries, None
        assert entries is not None, "handed on twice"
        for i in range(0, len(entries), chunk):
            yield entries[i:i + chunk]


class _Buffer:
    """Entries arrive by ``write``; ``take`` hands the active ones over, as a flip does."""

    max_entries = 100

    def __init__(self) -> None:
        self.active: list[int] = []
        self.evicted_next = 0
        self.takes = 0

    def write(self, *entries: int) -> None:
        self.active.extend(entries)

    def fill(self) -> int:
        return len(self.active)

    def take(self, *, writers_stopped: bool = False) -> _Taken:
        self.takes += 1
        taken = _Taken(self.active, self.evicted_next)
        self.active, self.evicted_next = [], 0
        return taken


def _drain(buf: _Buffer, early: EarlyDrain | None, on_wait: Any, out: list[int], *, fail_at: int = -1) -> Drain[int, int]:
    handed: list[list[int]] = []

    def hand_on(records: list[int]) -> None:
        if len(handed) == fail_at:
            raise RuntimeError("exporter failed")
        handed.append(records)
        out.extend(records)

    def wait(timeout: float) -> bool:
        return bool(on_wait(len(handed)))

    return Drain(buf, 10.0, lambda entries: list(entries), hand_on, wait, early=early, chunk=10)  # type: ignore[arg-type]


def test_a_burst_during_the_wait_is_taken_early_and_handed_on_after_once() -> None:
    buf = _Buffer()
    early = EarlyDrain(buf, 0.5, 8)  # type: ignore[arg-type]
    buf.write(*range(30))
    out: list[int] = []

    def on_wait(chunks_handed: int) -> bool:
        # While the first drain's second chunk waits, a burst past the threshold arrives.
        if chunks_handed == 1 and buf.takes == 1:
            buf.write(*range(100, 160))
        return True

    drain = _drain(buf, early, on_wait, out)
    drain.run()
    assert buf.takes == 2 and early.used == 1
    assert out == list(range(30)) + list(range(100, 160))  # the first drain's, then the early one's
    assert drain.handed == 90 and drain.abandoned == 0


def test_the_budget_spans_drains_until_a_new_interval() -> None:
    buf = _Buffer()
    early = EarlyDrain(buf, 0.5, 2)  # type: ignore[arg-type]
    out: list[int] = []
    n = 0

    def burst(_: int) -> bool:
        nonlocal n
        buf.write(*range(n, n + 60))
        n += 60
        return True

    buf.write(*range(1000, 1025))
    _drain(buf, early, burst, out).run()
    assert early.used == 2  # then no more, however full: the LRU's evictions are counted
    assert not early.due()
    early.new_interval()
    assert early.due()


def test_a_failing_hand_on_reports_evictions_and_counts_abandoned_takes() -> None:
    buf = _Buffer()
    early = EarlyDrain(buf, 0.5, 8)  # type: ignore[arg-type]
    buf.write(*range(30))
    buf.evicted_next = 5
    out: list[int] = []

    def on_wait(chunks_handed: int) -> bool:
        if buf.takes == 1:
            buf.write(*range(100, 160))
            buf.evicted_next = 7
        return True

    drain = _drain(buf, early, on_wait, out, fail_at=2)
    with pytest.raises(RuntimeError):
        drain.run()
    assert drain.evicted == 12  # both takes' evictions, though the second was never handed on
    assert drain.abandoned == 60


def test_no_early_take_when_writers_stopped_or_off() -> None:
    buf = _Buffer()
    buf.write(*range(80))
    out: list[int] = []
    _drain(buf, EarlyDrain(buf, 0.0, 8), lambda _: buf.write(*range(200, 260)) or True, out).run()  # type: ignore[arg-type]
    assert buf.takes == 1
    buf2 = _Buffer()
    buf2.write(*range(80))
    _drain(buf2, EarlyDrain(buf2, 0.5, 8), lambda _: buf2.write(*range(200, 260)) or True, out).run(  # type: ignore[arg-type]
        writers_stopped=True)
    assert buf2.takes == 1


def test_drain_at_fill_rule() -> None:
    assert check_drain_at_fill(0) == 0 and check_drain_at_fill(0.5) == 0.5
    for bad in (0.01, 0.95):
        with pytest.raises(ValueError):
            check_drain_at_fill(bad)
