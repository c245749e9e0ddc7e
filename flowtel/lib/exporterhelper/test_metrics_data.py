"""The series store's collection as the SDK's MetricsData: chunking by max_points, numbers,
start times (first reading, the source's own start, resets), and what the SDK's encoder
(the one its OTLPMetricExporter classes use) makes of it."""
from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import AggregationTemporality, Gauge, MetricsData, Sum
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from flowtel.lib.exporterhelper.metrics_data import number, to_metrics_data
from flowtel.lib.metrics.series import SeriesStore
from flowtel.records import MetricKind, MetricPoint

RESOURCE = Resource({"service.name": "flowtel", "k8s.node.name": "node-1"})
SCOPE = InstrumentationScope("flowtel", "1.2.3")


def collect(store: SeriesStore, temporality: str = "cumulative", now_ns: int = 1000,
            max_points: int = 100) -> list[tuple[MetricsData, int]]:
    return list(to_metrics_data(store.collect(temporality, now_ns), temporality, now_ns,  # type: ignore[arg-type]
                                RESOURCE, SCOPE, max_points))


def test_a_collection_is_split_into_chunks_of_at_most_max_points() -> None:
    store = SeriesStore("t", 100, 0)
    store.update([MetricPoint("a", i, MetricKind.SUM, 1, {"i": str(i)}) for i in range(5)]
                 + [MetricPoint("b", 1, MetricKind.GAUGE, 1)])
    chunks = collect(store, max_points=2)
    assert [n for _, n in chunks] == [2, 2, 2]
    names = [[(m.name, len(m.data.data_points)) for m in data.resource_metrics[0].scope_metrics[0].metrics]
             for data, _ in chunks]
    assert names == [[("a", 2)], [("a", 2)], [("a", 1), ("b", 1)]]  # "a" continues under its name
    for data, _ in chunks:
        (rm,) = data.resource_metrics
        assert rm.resource is RESOURCE and rm.scope_metrics[0].scope is SCOPE
    with pytest.raises(ValueError, match="max_points"):
        collect(store, max_points=0)


def test_sums_and_gauges_in_the_sdk_model_and_on_the_wire() -> None:
    store = SeriesStore("t", 100, 0)
    store.update([MetricPoint("drops", 5.0, MetricKind.SUM, 7, {"reason": "NO_SOCKET"}, "{packet}", "drops"),
                  MetricPoint("ratio", 0.25, MetricKind.GAUGE, 8, {"if": "eth0"})])
    ((data, count),) = collect(store, now_ns=1000)
    assert count == 2
    drops, ratio = data.resource_metrics[0].scope_metrics[0].metrics
    assert isinstance(drops.data, Sum) and isinstance(ratio.data, Gauge)
    assert drops.data.aggregation_temporality is AggregationTemporality.CUMULATIVE and drops.data.is_monotonic
    (dp,) = drops.data.data_points
    assert (dp.attributes, dp.start_time_unix_nano, dp.time_unix_nano, dp.value) == (
        {"reason": "NO_SOCKET"}, 7, 1000, 5)
    assert type(dp.value) is int  # integral counters go out as_int
    request = encode_metrics(data)
    wire = request.resource_metrics[0].scope_metrics[0].metrics
    assert (wire[0].name, wire[0].unit, wire[0].description) == ("drops", "{packet}", "drops")
    assert wire[0].sum.data_points[0].WhichOneof("value") == "as_int"
    assert wire[1].gauge.data_points[0].as_double == 0.25
    assert wire[1].gauge.data_points[0].start_time_unix_nano == 0  # gauges have no start
    assert {kv.key: kv.value.string_value for kv in request.resource_metrics[0].resource.attributes} == {
        "service.name": "flowtel", "k8s.node.name": "node-1"}
    assert request.resource_metrics[0].scope_metrics[0].scope.version == "1.2.3"


def test_numbers() -> None:
    assert [number(v) for v in (3.0, 2.5, 7, float("inf"), 2.0**70)] == [3, 2.5, 7, float("inf"), 2.0**70]
    assert type(number(2.0**70)) is float  # beyond int64: stays a double


def test_start_time_is_the_sources_own_when_it_knows_it() -> None:
    store = SeriesStore("t", 100, 0)
    boot = 50
    store.update([MetricPoint("since_boot", 100, MetricKind.SUM, 500, start_time_ns=boot),
                  MetricPoint("unknown", 100, MetricKind.SUM, 500)])
    ((data, _),) = collect(store, now_ns=1000)
    starts = {m.name: m.data.data_points[0].start_time_unix_nano for m in data.resource_metrics[0].scope_metrics[0].metrics}
    assert starts == {"since_boot": boot, "unknown": 500}  # unknown: the first reading's time
    # The source started counting again (a later start), although the value did not go down:
    # a new cumulative period, so delta does not subtract the old period's value.
    store.update([MetricPoint("since_boot", 120, MetricKind.SUM, 1500, start_time_ns=1400)])
    ((data, _),) = collect(store, now_ns=2000)
    (dp,) = [m for m in data.resource_metrics[0].scope_metrics[0].metrics if m.name == "since_boot"][0].data.data_points
    assert (dp.start_time_unix_nano, dp.value) == (1400, 120)


def test_delta_after_a_source_restart_with_a_new_start_time() -> None:
    store = SeriesStore("t", 100, 0)
    store.update([MetricPoint("c", 100, MetricKind.SUM, 500, start_time_ns=50)])
    collect(store, "delta", now_ns=1000)
    store.update([MetricPoint("c", 130, MetricKind.SUM, 1500, start_time_ns=1400)])
    ((data, _),) = collect(store, "delta", now_ns=2000)
    (dp,) = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert (dp.start_time_unix_nano, dp.time_unix_nano, dp.value) == (1400, 2000, 130)
