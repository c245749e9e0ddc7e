"""The latest value of every metric series, kept by each metrics exporter.

Receivers and connectors send :class:`MetricPoint` batches: cumulative readings for SUM
and HISTOGRAM, current values for GAUGE, either the whole current state each interval or
only the series that changed. An exporter therefore keeps, per series (metric name +
attribute set), the latest value, and every collection reports all live series, as an OTel
SDK periodic reader does with observable instruments.

The store is flowtel's metric *reader*: each collection becomes the SDK's ``MetricsData``
(:mod:`flowtel.lib.exporterhelper.metrics_data`) and goes out through opentelemetry-exporter-otlp's
exporter classes. Why not the SDK's MeterProvider instruments in front of them (read in
opentelemetry-sdk 1.45 source):

- flowtel's data arrives pre-aggregated (cumulative kernel counters, kernel histogram
  buckets), and the SDK has no instrument that takes pre-aggregated histogram buckets;
- synchronous cumulative and all asynchronous instruments never release an attribute set
  (``metric_reader_storage.py``: only delta synchronous storage is reset on collect), so a
  deleted pod's series stays forever and counts against the per-instrument cardinality
  limit until new series are merged into one ``otel.metric.overflow=true`` series;
- the SDK's delta conversion of an observable counter that went backwards (its source
  restarted) yields a negative delta on a monotonic sum.

Here expired series are forgotten (``series_ttl``), the limit (``cardinality_limit``,
series per metric name: the SDK's per-instrument limit, default 2000 there) refuses new
series and counts them (``series_refused``, one warning per metric name a minute) instead
of merging them, and a counter that goes backwards starts a new cumulative period.

A HISTOGRAM series keeps its latest :class:`HistogramValue`; its delta is taken per bucket
(and for sum and count) against the previous collection. A histogram whose count or any
bucket's count went backwards, or whose bounds changed, starts a new cumulative period, as
a SUM that went backwards does.

Thread-safe: points arrive on the exporter's pipeline worker while collections run on a
timer thread or an HTTP scrape.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping

from flowtel.records import MetricKind, MetricPoint

log = logging.getLogger("flowtel.exporters.series")

Temporality = Literal["cumulative", "delta"]
SeriesKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """A histogram's state: per-bucket counts (``len(bounds) + 1``), sum and count."""

    bounds: tuple[float, ...]
    bucket_counts: tuple[int, ...]
    sum: float
    count: int

    @classmethod
    def of(cls, point: MetricPoint) -> HistogramValue:
        return cls(tuple(point.bounds), tuple(point.bucket_counts), float(point.value), int(point.count))

    def went_back_from(self, earlier: HistogramValue) -> bool:
        """Whether this cannot follow ``earlier`` in one cumulative period (a reset)."""
        return (self.bounds != earlier.bounds or self.count < earlier.count
                or any(now < before for now, before in zip(self.bucket_counts, earlier.bucket_counts)))

    def minus(self, earlier: HistogramValue | None) -> HistogramValue:
        """The observations since ``earlier`` (everything when there is no comparable one)."""
        if earlier is None or self.went_back_from(earlier):
            return self
        return HistogramValue(self.bounds,
                              tuple(now - before for now, before in zip(self.bucket_counts, earlier.bucket_counts)),
                              self.sum - earlier.sum, self.count - earlier.count)


def _histogram_error(point: MetricPoint) -> str:
    """Why a HISTOGRAM point cannot be kept, or ``""``."""
    if len(point.bucket_counts) != len(point.bounds) + 1:
        return f"sent a histogram with {len(point.bucket_counts)} bucket counts for {len(point.bounds)} bounds"
    if any(a >= b for a, b in zip(point.bounds, point.bounds[1:])):
        return "sent a histogram whose bounds are not strictly increasing"
    if sum(point.bucket_counts) != point.count:
        return f"sent a histogram whose bucket counts add up to {sum(point.bucket_counts)}, not its count {point.count}"
    return ""


@dataclass(slots=True)
class _Series:
    attributes: dict[str, str]
    value: float | HistogramValue
    updated: float  # monotonic seconds of the last point, for expiry
    # Wall-clock ns since which a SUM/HISTOGRAM has been counting: the source's start_time_ns
    # when it knows it, else the first reading's time (or that of the reading that reset it).
    start_ns: int
    sent_value: float = 0.0  # SUM value at the previous delta collection
    sent_ns: int = 0  # time of the previous delta collection (0: none yet)
    sent_histogram: HistogramValue | None = None  # HISTOGRAM value at the previous delta collection


@dataclass(slots=True)
class _Family:
    name: str
    kind: MetricKind
    unit: str
    description: str
    series: dict[SeriesKey, _Series] = field(default_factory=dict)


@dataclass(slots=True)
class FamilySnapshot:
    """One metric's points at one collection; ``points`` are (attributes, value, start_ns).

    A HISTOGRAM family's values are :class:`HistogramValue`; the others' are numbers.
    """

    name: str
    kind: MetricKind
    unit: str
    description: str
    points: list[tuple[Mapping[str, str], float | HistogramValue, int]]


@dataclass(slots=True)
class UpdateResult:
    accepted: int = 0
    refused: int = 0  # new series beyond the cardinality limit, a kind that conflicts, a malformed histogram


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
                histogram = family.kind is MetricKind.HISTOGRAM
                if histogram:
                    why = _histogram_error(point)
                    if why:
                        result.refused += 1
                        refused_by_name[point.name] = why
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
                    value = HistogramValue.of(point) if histogram else point.value
                    family.series[key] = _Series(dict(point.attributes), value, now,
                                                 point.start_time_ns or point.time_ns)
                    self._size += 1
                elif histogram:
                    hist = HistogramValue.of(point)
                    assert isinstance(series.value, HistogramValue)  # a family is histograms or numbers
                    if hist.went_back_from(series.value) or point.start_time_ns > series.start_ns:
                        series.start_ns = point.start_time_ns or point.time_ns
                        series.sent_histogram = None
                    series.value = hist
                    series.updated = now
                else:
                    assert not isinstance(series.value, HistogramValue)
                    if family.kind is MetricKind.SUM and (point.value < series.value
                                                          or point.start_time_ns > series.start_ns):
                        # The source's counter restarted (went backwards, or the source says it
                        # started counting again later): a new cumulative period begins.
                        series.start_ns = point.start_time_ns or point.time_ns
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
        """Every live series' point. ``delta`` advances each SUM's and HISTOGRAM's delta baseline
        to ``now_ns``."""
        delta = temporality == "delta"
        out = []
        with self._lock:
            for family in self._families.values():
                points: list[tuple[Mapping[str, str], float | HistogramValue, int]] = []
                if delta and family.kind is MetricKind.HISTOGRAM:
                    for s in family.series.values():
                        start = s.sent_ns if s.sent_ns > s.start_ns else s.start_ns
                        assert isinstance(s.value, HistogramValue)
                        points.append((s.attributes, s.value.minus(s.sent_histogram), start))
                        s.sent_histogram = s.value
                        s.sent_ns = now_ns
                elif delta and family.kind is MetricKind.SUM:
                    for s in family.series.values():
                        start = s.sent_ns if s.sent_ns > s.start_ns else s.start_ns
                        assert not isinstance(s.value, HistogramValue)
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
