"""Cumulative counters per (metric, label values), with idle expiry and a hard series bound."""
from __future__ import annotations

import time


class SeriesStore:
    """Not thread-safe by itself: the connector holds its lock around every call."""

    def __init__(self, max_series: int, expiry_s: float) -> None:
        self.max_series = max_series
        self.expiry_s = expiry_s
        # key -> [value, monotonic time of the last increment]
        self._series: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        self.overflow = 0  # increments refused because the bound was reached
        self.expired = 0
        # Set by the connector for the length of one batch: one clock read per batch, not per increment.
        self.batch_time: float | None = None

    def __len__(self) -> int:
        return len(self._series)

    def add(self, name: str, labels: tuple[str, ...], value: float, now: float | None = None) -> None:
        key = (name, labels)
        entry = self._series.get(key)
        t = now if now is not None else self.batch_time if self.batch_time is not None else time.monotonic()
        if entry is None:
            if len(self._series) >= self.max_series:
                self.overflow += 1
                return
            self._series[key] = [value, t]
            return
        entry[0] += value
        entry[1] = t

    def expire(self, now: float | None = None) -> int:
        if self.expiry_s <= 0:
            return 0
        cutoff = (time.monotonic() if now is None else now) - self.expiry_s
        stale = [k for k, (_, t) in self._series.items() if t < cutoff]
        for k in stale:
            del self._series[k]
        self.expired += len(stale)
        return len(stale)

    def items(self) -> list[tuple[str, tuple[str, ...], float]]:
        return [(name, labels, entry[0]) for (name, labels), entry in self._series.items()]
