"""Metric export cost: series per second and cost per export cycle at 1k, 10k and 50k series,
and the per-record cost of flow-log encoding through flowtel's encoder and the SDK's log model.

One metric export cycle is what an OTLP exporter does each interval: take a batch of
cumulative points into its series store (update), collect them as the SDK's ``MetricsData``
(the store is the reader), and encode that the way opentelemetry-exporter-otlp's
``OTLPMetricExporter`` does on every export (``encode_metrics`` + ``SerializeToString``);
plus the prometheus exporter's text page. No network, gzip or retries: the cost measured is
flowtel's and the SDK's CPU work. CPU time of this thread, median of several cycles.

For comparison in the same run, ``direct`` is the encoding flowtel used before the SDK
exporters (opentelemetry-proto messages built in place with ``add()``), kept here only as a
yardstick: ``sdk/direct`` is what the SDK data model and encoder cost on top of it.

Logs: one pod-to-pod flow with its Hubble body as an OTLP map, 2000 records per batch,
serialized request; ``flowtel`` is :class:`flowtel.lib.exporterhelper.otlp_encoding.OtlpEncoder` (what
the otlp exporters send), ``sdk`` is the same record through the SDK's log data model
(``LogRecord`` + ``ReadableLogRecord`` + ``encode_logs``), as its ``OTLPLogExporter`` needs.

Run with ``make bench`` or ``python -m bench.exporters [--sizes 1000,10000,50000] [--reps 5]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from flowtel.lib.exporterhelper.metrics_data import number, to_metrics_data
from flowtel.lib.exporterhelper.otlp_encoding import (
    FLOWTEL_VERSION,
    OtlpEncoder,
    flow_attributes,
    flow_severity,
    resource_attributes,
)
from flowtel.lib.metrics.series import FamilySnapshot, SeriesStore
from flowtel.lib.metrics.exposition import render
from flowtel.lib.hubble import convert
from flowtel.records import MetricKind, MetricPoint

BATCH = 8192  # data points per request: the chunking is not what is measured
LOG_BATCH = 2000


@dataclass(slots=True)
class Result:
    series: int
    update_s: float
    collect_s: float  # store -> MetricsData
    encode_s: float  # the SDK exporter's encode_metrics + SerializeToString
    direct_s: float  # the pre-SDK in-place protobuf encoding, from the same snapshot
    prometheus_s: float

    @property
    def otlp_cycle_s(self) -> float:
        return self.update_s + self.collect_s + self.encode_s


@dataclass(slots=True)
class LogResult:
    flowtel_us: float  # per record
    sdk_us: float


@dataclass(slots=True)
class Run:
    metrics: list[Result]
    logs: LogResult  # measured in the same run, so the ratio is not skewed by a busy machine


def _points(n: int, cycle: int) -> list[MetricPoint]:
    # Shaped like hubble_flows_processed_total with pod contexts: 6 labels per series.
    now = time.time_ns()
    return [
        MetricPoint(
            "hubble_flows_processed_total",
            float(cycle * 10 + i % 7),
            MetricKind.SUM,
            now,
            {
                "source": f"ns{i % 50}/pod-{i}",
                "destination": f"ns{(i * 7) % 50}/pod-{(i * 13) % n}",
                "protocol": "TCP",
                "type": "Trace",
                "subtype": "to-endpoint",
                "verdict": "FORWARDED",
            },
        )
        for i in range(n)
    ]


def _direct(families: Sequence[FamilySnapshot], resource: Mapping[str, str], now_ns: int) -> bytes:
    """The pre-SDK encoding of SUM families (what bench points are): messages built in place."""
    request = ExportMetricsServiceRequest()
    rm = request.resource_metrics.add()
    for key, value in resource.items():
        kv = rm.resource.attributes.add()
        kv.key, kv.value.string_value = key, value
    sm = rm.scope_metrics.add()
    sm.scope.name, sm.scope.version = "flowtel", FLOWTEL_VERSION
    for family in families:
        metric = sm.metrics.add()
        metric.name = family.name
        metric.sum.is_monotonic = True
        metric.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
        out = metric.sum.data_points
        for attributes, value, start_ns in family.points:
            dp = out.add()
            dp.start_time_unix_nano = start_ns
            dp.time_unix_nano = now_ns
            v = number(value)  # type: ignore[arg-type]
            if isinstance(v, int):
                dp.as_int = v
            else:
                dp.as_double = v
            attrs = dp.attributes
            for key, item in attributes.items():
                kv = attrs.add()
                kv.key = key
                kv.value.string_value = item
    return request.SerializeToString()


def measure(n: int, reps: int) -> Result:
    store = SeriesStore("bench", cardinality_limit=max(n * 2, 100_000), series_ttl=3600.0)
    attributes = resource_attributes("bench-node")
    resource, scope = Resource(attributes), InstrumentationScope("flowtel", FLOWTEL_VERSION)
    updates, collects, encodes, directs, proms = [], [], [], [], []
    for cycle in range(reps + 1):  # the first cycle creates the series: not counted
        points = _points(n, cycle)
        now = time.time_ns()
        t0 = time.thread_time()
        store.update(points)
        t1 = time.thread_time()
        families = store.collect("cumulative", now)
        chunks = list(to_metrics_data(families, "cumulative", now, resource, scope, BATCH))
        t2 = time.thread_time()
        size = sum(len(encode_metrics(data).SerializeToString()) for data, _ in chunks)
        t3 = time.thread_time()
        direct = _direct(families, attributes, now)
        t4 = time.thread_time()
        page = render(families)
        t5 = time.thread_time()
        assert size > 0 and page and len(direct) > 0
        if cycle:
            updates.append(t1 - t0)
            collects.append(t2 - t1)
            encodes.append(t3 - t2)
            directs.append(t4 - t3)
            proms.append(t5 - t4)
    med = statistics.median
    return Result(n, med(updates), med(collects), med(encodes), med(directs), med(proms))


def measure_logs(reps: int) -> LogResult:
    from tests.support.exporting import pod_flow  # the exporter tests' pod-to-pod flow

    flows = [pod_flow(i) for i in range(LOG_BATCH)]
    attributes = resource_attributes("bench-node")
    encoder = OtlpEncoder(attributes, max_batch_size=LOG_BATCH)
    resource, scope = Resource(attributes), InstrumentationScope("flowtel", FLOWTEL_VERSION)
    ours, sdk = [], []
    for _ in range(reps):
        now = time.time_ns()
        t0 = time.thread_time()
        ((payload, _),) = list(encoder.logs(flows, now))
        t1 = time.thread_time()
        records = []
        for flow in flows:
            number_, text = flow_severity(flow)
            records.append(ReadableLogRecord(
                LogRecord(timestamp=flow.time_ns, observed_timestamp=now, severity_text=text,
                          severity_number=SeverityNumber(number_), body=convert.flow_json(flow),
                          attributes=flow_attributes(flow), event_name="flowtel.flow"),
                resource=resource, instrumentation_scope=scope))
        sdk_payload = encode_logs(records).SerializeToString()
        t2 = time.thread_time()
        assert payload and sdk_payload
        ours.append((t1 - t0) / LOG_BATCH)
        sdk.append((t2 - t1) / LOG_BATCH)
    return LogResult(statistics.median(ours) * 1e6, statistics.median(sdk) * 1e6)


def run(sizes: tuple[int, ...] = (1000, 10_000, 50_000), reps: int = 5) -> Run:
    return Run([measure(n, reps) for n in sizes], measure_logs(reps))


def report(measured: Run) -> str:
    results, logs = measured.metrics, measured.logs
    lines = [f"{'series':>8} {'update ms':>10} {'collect ms':>11} {'encode ms':>10} {'cycle ms':>9} "
             f"{'series/s':>10} {'direct ms':>10} {'sdk/direct':>11} {'prom ms':>8}"]
    for r in results:
        sdk_path = r.collect_s + r.encode_s
        lines.append(
            f"{r.series:>8} {r.update_s * 1e3:>10.1f} {r.collect_s * 1e3:>11.1f} {r.encode_s * 1e3:>10.1f} "
            f"{r.otlp_cycle_s * 1e3:>9.1f} {r.series / r.otlp_cycle_s:>10.0f} {r.direct_s * 1e3:>10.1f} "
            f"{sdk_path / r.direct_s:>11.2f} {r.prometheus_s * 1e3:>8.1f}"
        )
    lines.append(f"logs: flowtel encoder {logs.flowtel_us:.1f} µs/record, SDK log model {logs.sdk_us:.1f} µs/record, "
                 f"ratio {logs.sdk_us / logs.flowtel_us:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    print(report(run(tuple(int(s) for s in args.sizes.split(",")), args.reps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
