"""Histogram points end to end in the shared exporter code: bucket accounting, the series
store (cumulative, delta, resets, malformed points), and OTLP HistogramDataPoints as the SDK's
encoder (the one its OTLPMetricExporter classes use) writes them from the store's MetricsData."""
from __future__ import annotations

import math

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, HistogramDataPoint
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from flowtel.lib.exporterhelper.metrics_data import to_metrics_data
from flowtel.lib.metrics.series import HistogramValue, SeriesStore
from flowtel.histogram import Histogram, bucket_index, check_bounds
from flowtel.records import MetricKind, MetricPoint

BOUNDS = (0.001, 0.01, 0.1)


def hist(counts: tuple[int, ...], total: float, t: int = 1, name: str = "lat", bounds: tuple[float, ...] = BOUNDS,
         count: int | None = None, **attrs: str) -> MetricPoint:
    return MetricPoint(name, total, MetricKind.HISTOGRAM, t, attrs, "s", "latency", bounds=bounds,
                       bucket_counts=counts, count=sum(counts) if count is None else count)


def only_value(store: SeriesStore, temporality: str = "cumulative", now_ns: int = 100) -> tuple[HistogramValue, int]:
    (family,) = store.collect(temporality, now_ns)  # type: ignore[arg-type]
    assert family.kind is MetricKind.HISTOGRAM
    ((_attrs, value, start),) = family.points
    assert isinstance(value, HistogramValue)
    return value, start


# -- bucket accounting ---------------------------------------------------------------------


def test_upper_bounds_are_inclusive_and_the_last_bucket_takes_the_rest() -> None:
    h = Histogram(BOUNDS)
    for v in (0.0, -1.0, 0.001, 0.0010001, 0.01, 0.05, 0.1, 0.2, math.inf, math.nan):
        h.observe(v)
    p = h.point("lat", 9, {"a": "b"}, "s", "d")
    # ≤0.001: 0, -1, 0.001 | ≤0.01: 0.0010001, 0.01 | ≤0.1: 0.05, 0.1 | rest: 0.2, inf. NaN: ignored.
    assert p.bucket_counts == (3, 2, 2, 2)
    assert p.count == 9 and p.count == sum(p.bucket_counts)
    assert p.value == math.inf
    assert (p.name, p.kind, p.time_ns, p.attributes, p.unit, p.description, p.bounds) == (
        "lat", MetricKind.HISTOGRAM, 9, {"a": "b"}, "s", "d", BOUNDS)
    assert [bucket_index(BOUNDS, v) for v in (0.0005, 0.001, 0.002, 0.1, 0.11)] == [0, 0, 1, 2, 3]


def test_points_are_cumulative_snapshots() -> None:
    h = Histogram(BOUNDS)
    h.observe(0.005)
    first = h.point("lat", 1)
    h.observe(0.005)
    h.observe(0.5)
    second = h.point("lat", 2)
    assert (first.bucket_counts, first.count, first.value) == ((0, 1, 0, 0), 1, 0.005)
    assert (second.bucket_counts, second.count) == ((0, 2, 0, 1), 3)
    assert second.value == pytest.approx(0.51)


def test_bounds_must_be_finite_and_strictly_increasing() -> None:
    assert check_bounds([1, 2.5]) == (1.0, 2.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((0.1, 0.1))
    with pytest.raises(ValueError, match="finite"):
        Histogram((0.1, math.inf))


def test_sum_and_gauge_points_keep_their_positional_fields() -> None:
    p = MetricPoint("m", 3.0, MetricKind.SUM, 5, {"k": "v"}, "By", "bytes")
    assert (p.unit, p.description, p.bounds, p.bucket_counts, p.count) == ("By", "bytes", (), (), 0)


# -- the series store --------------------------------------------------------------------------


def test_store_keeps_the_latest_cumulative_histogram() -> None:
    store = SeriesStore("t", 10, 0)
    store.update([hist((1, 0, 0, 0), 0.0005, t=5), hist((1, 2, 0, 1), 0.6, t=6)])
    value, start = only_value(store)
    assert value == HistogramValue(BOUNDS, (1, 2, 0, 1), 0.6, 4)
    assert start == 5


def test_store_delta_subtracts_per_bucket_and_restarts_after_a_reset() -> None:
    store = SeriesStore("t", 10, 0)
    store.update([hist((1, 0, 0, 0), 0.5, t=5)])
    assert only_value(store, "delta", 100) == (HistogramValue(BOUNDS, (1, 0, 0, 0), 0.5, 1), 5)
    store.update([hist((1, 3, 0, 2), 2.0, t=150)])
    assert only_value(store, "delta", 200) == (HistogramValue(BOUNDS, (0, 3, 0, 2), 1.5, 5), 100)
    assert only_value(store, "delta", 300) == (HistogramValue(BOUNDS, (0, 0, 0, 0), 0.0, 0), 200)
    # One bucket went backwards although the count grew: the source restarted.
    store.update([hist((0, 0, 9, 0), 0.45, t=350)])
    assert only_value(store, "delta", 400) == (HistogramValue(BOUNDS, (0, 0, 9, 0), 0.45, 9), 350)
    # New bounds: a new cumulative period too.
    other = (0.5, 1.0)
    store.update([hist((0, 10, 0), 7.0, t=450, bounds=other)])
    assert only_value(store, "delta", 500) == (HistogramValue(other, (0, 10, 0), 7.0, 10), 450)
    assert only_value(store, "cumulative", 600) == (HistogramValue(other, (0, 10, 0), 7.0, 10), 450)


def test_store_refuses_malformed_histograms_and_kind_conflicts() -> None:
    store = SeriesStore("t", 10, 0)
    result = store.update([
        hist((1, 0, 0), 0.1),  # 3 counts for 3 bounds
        hist((1, 0, 0, 0), 0.1, count=2),  # counts do not add up to the count
        hist((1, 0, 0), 0.1, bounds=(0.1, 0.01)),  # bounds not increasing
        hist((1, 0, 0, 0), 0.0005, pod="a"),
        MetricPoint("lat", 1.0, MetricKind.SUM, 1),
    ])
    assert (result.accepted, result.refused) == (1, 4)
    assert len(store) == 1


# -- OTLP encoding -----------------------------------------------------------------------------


def encode(store: SeriesStore, temporality: str, now_ns: int) -> ExportMetricsServiceRequest:
    ((data, count),) = list(to_metrics_data(store.collect(temporality, now_ns), temporality, now_ns,  # type: ignore[arg-type]
                                            Resource({"service.name": "flowtel"}), InstrumentationScope("flowtel"), 100))
    request = ExportMetricsServiceRequest.FromString(encode_metrics(data).SerializeToString())
    assert count == len(request.resource_metrics[0].scope_metrics[0].metrics[0].histogram.data_points)
    return request


def decoded(request: ExportMetricsServiceRequest) -> tuple[int, dict[tuple, HistogramDataPoint]]:
    (metric,) = request.resource_metrics[0].scope_metrics[0].metrics
    assert (metric.name, metric.unit, metric.description) == ("lat", "s", "latency")
    assert metric.WhichOneof("data") == "histogram"
    points = {tuple((kv.key, kv.value.string_value) for kv in dp.attributes): dp
              for dp in metric.histogram.data_points}
    return metric.histogram.aggregation_temporality, points


def test_otlp_histogram_data_points_cumulative() -> None:
    store = SeriesStore("t", 10, 0)
    store.update([hist((2, 1, 0, 1), 1.25, t=7, node="n1"), hist((0, 0, 3, 0), 0.2, t=8, node="n2")])
    temporality, points = decoded(encode(store, "cumulative", 1000))
    assert temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    n1 = points[(("node", "n1"),)]
    assert list(n1.explicit_bounds) == list(BOUNDS)
    assert list(n1.bucket_counts) == [2, 1, 0, 1]
    assert (n1.count, n1.sum) == (4, 1.25)
    assert (n1.start_time_unix_nano, n1.time_unix_nano) == (7, 1000)
    # Kernel histograms do not know their extremes: min/max are left out, not made up.
    assert not n1.HasField("min") and not n1.HasField("max")
    n2 = points[(("node", "n2"),)]
    assert (list(n2.bucket_counts), n2.count, n2.sum, n2.start_time_unix_nano) == ([0, 0, 3, 0], 3, 0.2, 8)


def test_otlp_histogram_data_points_delta() -> None:
    store = SeriesStore("t", 10, 0)
    store.update([hist((2, 1, 0, 1), 1.25, t=7)])
    temporality, points = decoded(encode(store, "delta", 1000))
    assert temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    first = points[()]
    assert (list(first.bucket_counts), first.count, first.sum) == ([2, 1, 0, 1], 4, 1.25)
    assert (first.start_time_unix_nano, first.time_unix_nano) == (7, 1000)
    store.update([hist((2, 4, 1, 1), 1.5, t=1500)])
    _, points = decoded(encode(store, "delta", 2000))
    second = points[()]
    assert list(second.explicit_bounds) == list(BOUNDS)
    assert list(second.bucket_counts) == [0, 3, 1, 0]
    assert second.count == 4 and second.sum == pytest.approx(0.25)
    assert (second.start_time_unix_nano, second.time_unix_nano) == (1000, 2000)
