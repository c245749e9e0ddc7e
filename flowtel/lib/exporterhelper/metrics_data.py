"""One collection of the series store as the OTel SDK's metric data model.

The OTLP exporters hand opentelemetry-exporter-otlp's ``OTLPMetricExporter`` classes
(gRPC and HTTP) a :class:`MetricsData`, exactly what an SDK ``MetricReader`` hands them.
The SDK's own instruments do not produce it here (see :mod:`flowtel.lib.metrics.series` for
why the store is the reader); this module only maps the store's snapshot onto
``Metric``/``Sum``/``Gauge``/``Histogram`` and their data points.

Start times (``start_time_unix_nano``):

- cumulative SUM and HISTOGRAM: when the series' current cumulative period began, i.e. the
  point's own ``start_time_ns`` when its source knows when it started counting, else the
  time of the first reading this exporter received (or of the reading that went backwards:
  a reset starts a new period). For flowtel's sources that count from zero when a series
  appears (hubblemetrics connector series, ebpf map counters created at agent start) the
  first reading is within one collection interval of the true start;
- delta SUM and HISTOGRAM: the previous collection's time (the period's start for the first
  collection after it began), so consecutive deltas tile time without gaps or overlap;
- GAUGE: none (0), as the SDK sends gauges.

Every point of one collection carries the collection time as ``time_unix_nano``.

A collection is split into :class:`MetricsData` chunks of at most ``max_points`` data
points: each chunk is one request, sent (and retried) on its own, so a retry never resends
points that were already delivered. A metric longer than a chunk continues in the next one
under the same name and type; receivers merge them by identity.
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

from opentelemetry.sdk.metrics import (
    Counter,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from flowtel.lib.metrics.series import FamilySnapshot, HistogramValue, Temporality
from flowtel.records import MetricKind

SDK_TEMPORALITY = {"cumulative": AggregationTemporality.CUMULATIVE, "delta": AggregationTemporality.DELTA}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# HistogramDataPoint.min/max are optional in OTLP. Kernel histograms do not record
# extremes, and a made-up value (0, or the SDK dataclass's usual float) would be wrong
# data. None makes the SDK's encoder leave both fields unset, which OTLP reads as
# "unknown" (checked by the tests against a real receiver).
_UNKNOWN = None


def preferred_temporality(temporality: Temporality) -> dict[type, AggregationTemporality]:
    """The SDK exporter's ``preferred_temporality`` for flowtel's ``temporality`` key.

    The store already computed the temporality (an SDK reader would ask the exporter for
    it); this states the same choice on the exporter so the two never disagree. Gauges and
    up-down counters have no delta form in flowtel, as in the SDK's own delta preset."""
    chosen = SDK_TEMPORALITY[temporality]
    return {Counter: chosen, HistogramInstrument: chosen, ObservableCounter: chosen,
            UpDownCounter: AggregationTemporality.CUMULATIVE,
            ObservableUpDownCounter: AggregationTemporality.CUMULATIVE,
            ObservableGauge: AggregationTemporality.CUMULATIVE}


def number(value: float) -> int | float:
    """Integers as ``int`` (the encoder then sends ``as_int``, exact past 2**53), else ``float``."""
    if isinstance(value, int):
        return value if _INT64_MIN <= value <= _INT64_MAX else float(value)
    if math.isfinite(value) and value.is_integer() and _INT64_MIN <= value <= _INT64_MAX:
        return int(value)
    return value


def to_metrics_data(
    families: Sequence[FamilySnapshot],
    temporality: Temporality,
    now_ns: int,
    resource: Resource,
    scope: InstrumentationScope,
    max_points: int,
) -> Iterator[tuple[MetricsData, int]]:
    """(MetricsData, number of data points) per chunk of at most ``max_points`` points."""
    if max_points < 1:
        raise ValueError("max_points must be at least 1")
    sdk_temporality = SDK_TEMPORALITY[temporality]
    metrics: list[Metric] = []
    count = 0
    for family in families:
        points = family.points
        i = 0
        while i < len(points):
            room = max_points - count
            if room == 0:
                yield _wrap(metrics, resource, scope), count
                metrics, count = [], 0
                room = max_points
            part = points[i:i + room]
            i += len(part)
            metrics.append(_metric(family, part, sdk_temporality, now_ns))
            count += len(part)
    if count:
        yield _wrap(metrics, resource, scope), count


def _wrap(metrics: list[Metric], resource: Resource, scope: InstrumentationScope) -> MetricsData:
    return MetricsData(resource_metrics=[ResourceMetrics(
        resource=resource, scope_metrics=[ScopeMetrics(scope=scope, metrics=metrics, schema_url="")],
        schema_url="")])


def _metric(family: FamilySnapshot, part: Sequence[tuple[Mapping[str, str], object, int]],
            temporality: AggregationTemporality, now_ns: int) -> Metric:
    data: Sum | Gauge | Histogram
    if family.kind is MetricKind.SUM:
        data = Sum(data_points=[NumberDataPoint(attributes, start_ns, now_ns, number(value))  # type: ignore[arg-type]  # the part's points are all histograms or all numbers, as its kind says
                                for attributes, value, start_ns in part],
                   aggregation_temporality=temporality, is_monotonic=True)
    elif family.kind is MetricKind.HISTOGRAM:
        data = Histogram(data_points=[_histogram_point(attributes, value, start_ns, now_ns)  # type: ignore[arg-type]  # the part's points are all histograms or all numbers, as its kind says
                                      for attributes, value, start_ns in part],
                         aggregation_temporality=temporality)
    else:
        data = Gauge(data_points=[NumberDataPoint(attributes, 0, now_ns, number(value))  # type: ignore[arg-type]  # the part's points are all histograms or all numbers, as its kind says
                                  for attributes, value, _start in part])
    return Metric(name=family.name, description=family.description, unit=family.unit, data=data)


def _histogram_point(attributes: Mapping[str, str], value: HistogramValue, start_ns: int,
                     now_ns: int) -> HistogramDataPoint:
    return HistogramDataPoint(attributes=attributes, start_time_unix_nano=start_ns, time_unix_nano=now_ns,
                              count=value.count, sum=value.sum, bucket_counts=value.bucket_counts,
                              explicit_bounds=value.bounds, min=_UNKNOWN, max=_UNKNOWN)  # type: ignore[arg-type]  # the part's points are all histograms or all numbers, as its kind says
