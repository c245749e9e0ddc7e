"""The latest value of every metric series, kept by each metrics exporter.

Receivers and connectors send :class:`MetricPoint` batches: cumulative readings for SUM,
current values for GAUGE, either the whole current state each interval or only the series
that changed. An exporter therefore keeps, per series (metric name + attribute set), the
latest value, and every collection reports all live series, as an OTel SDK periodic
reader does with observable instruments.

Why not the SDK's MeterProvider with observable instruments: the SDK keeps the state of
every attribute set it has ever seen for an asynchronous instrument (it never forgets one,
because its delta conversion relies on it), so pod churn fills its per-instrument
cardinality limit with dead series until new ones overflow into a merged
``otel.metric.overflow`` series; and its delta conversion of a counter that went backwards
(a receiver restarted) yields a negative delta on a monotonic sum. Here expired series are
forgotten, the limit is enforced by refusing (and counting) new series instead of merging
them, and a counter that goes backwards starts a new cumulative period.

Thread-safe: points arrive on the exporter's pipeline worker while collections run on a
timer thread or an HTTP scrape.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Literal

from flowtel.records import MetricKind, MetricPoint

log = logging.getLogger("flowtel.exporters.series")

Temporality = Literal["cumulative", "delta"]
SeriesKey = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Series:
    attributes: dict[str, str]
    value: float
    updated: float  # monotonic seconds of the last point, for expiry
    start_ns: int  # wall-clock ns since which a SUM has been counting (first seen or last reset)
    sent_value: float = 0.0  # SUM value at the previous delta collection
    sent_ns: int = 0  # time of the previous delta collection (0: none yet)


@dataclass(slots=True)
class _Family:
    name: str
    kind: MetricKind
    unit: str
    description: str
    series: dict[SeriesKey, _Series] = field(default_factory=dict)


@dataclass(slots=True)
class FamilySnapshot:
    """One metric's points at one collection; ``points`` are (attributes, value, start_ns)."""

    name: str
    kind: MetricKind
    unit: str
    description: str
    points: list[tuple[dict[str, str], float, int]]


@dataclass(slots=True)
class UpdateResult:
    accepted: int = 0
    refused: int = 0  # new series beyond the cardinality limit, or a kind that conflicts


class SeriesStore:
    """Latest value per series, with a per-metric series limit and expiry of idle series."""

    def __init__(self, owner: str, cardinality_limit: int, series_ttl: float) -> None:
        if cardinality_limit < 1:
            raise ValueError("cardinality_limit must be at least 1")
        self.owner = owner
        self.cardinality_limit = cardinality_limit
        self.series_ttl = series_ttl  # seconds; 0 keeps series forever
        self._families: dict[str, _Family] = {}
        self._lock = threading.Lock()
        self._size = 0
        self._last_warning: dict[str, float] = {}

    def __len__(self) -> int:
        return self._size

    def update(self, points: Iterable[MetricPoint], now: float | None = None) -> UpdateResult:
        """Take points as the latest values of their series."""
        now = time.monotonic() if now is None else now
        result = UpdateResult()
        refused_by_name: dict[str, str] = {}
        with self._lock:
            for point in points:
                family = self._families.get(point.name)
                if family is None:
                    family = _Family(point.name, point.kind, point.unit, point.description)
                    self._families[point.name] = family
                elif family.kind is not point.kind:
                    # One name, two kinds: a backend would reject or mix them; keep the first.
                    result.refused += 1
                    refused_by_name[point.name] = f"is a {family.kind.value}, got a {point.kind.value} point"
                    continue
                if point.description and not family.description:
                    family.description = point.description
                if point.unit and not family.unit:
                    family.unit = point.unit
                key = tuple(sorted(point.attributes.items()))
                series = family.series.get(key)
                if series is None:
                    if len(family.series) >= self.cardinality_limit:
                        result.refused += 1
                        refused_by_name[point.name] = f"has {len(family.series)} series, the cardinality_limit"
                        continue
                    family.series[key] = _Series(dict(point.attributes), point.value, now, point.time_ns)
                    self._size += 1
                else:
                    if family.kind is MetricKind.SUM and point.value < series.value:
                        # The source's counter restarted: a new cumulative period begins.
                        series.start_ns = point.time_ns
                        series.sent_value = 0.0
                    series.value = point.value
                    series.updated = now
                result.accepted += 1
        for name, why in refused_by_name.items():
            self._warn(name, why)
        return result

    def expire(self, now: float | None = None) -> int:
        """Forget series without a point for ``series_ttl`` (e.g. of deleted pods)."""
        if not self.series_ttl:
            return 0
        now = time.monotonic() if now is None else now
        horizon = now - self.series_ttl
        removed = 0
        with self._lock:
            for name in list(self._families):
                family = self._families[name]
                stale = [k for k, s in family.series.items() if s.updated < horizon]
                for k in stale:
                    del family.series[k]
                removed += len(stale)
                if not family.series:
                    del self._families[name]
            self._size -= removed
        return removed

    def collect(self, temporality: Temporality, now_ns: int) -> list[FamilySnapshot]:
        """Every live series' point. ``delta`` advances each SUM's delta baseline to ``now_ns``."""
        delta = temporality == "delta"
        out = []
        with self._lock:
            for family in self._families.values():
                points: list[tuple[dict[str, str], float, int]] = []
                if delta and family.kind is MetricKind.SUM:
                    for s in family.series.values():
                        start = s.sent_ns if s.sent_ns > s.start_ns else s.start_ns
                        points.append((s.attributes, s.value - s.sent_value, start))
                        s.sent_value = s.value
                        s.sent_ns = now_ns
                else:
                    for s in family.series.values():
                        points.append((s.attributes, s.value, s.start_ns))
                out.append(FamilySnapshot(family.name, family.kind, family.unit, family.description, points))
        return out

    def _warn(self, name: str, why: str) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(name, -1e9) < 60:
            return
        self._last_warning[name] = now
        log.warning(
            "%s: metric %s %s; new series are refused and counted (telemetry series_refused), "
            "not merged. Raise cardinality_limit or reduce label cardinality upstream.",
            self.owner, name, why,
        )
