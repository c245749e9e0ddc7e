"""Records to OTLP protobuf requests, built in place on opentelemetry-proto's messages.

Building the messages directly (``add()`` on repeated fields) rather than through the
SDK's data model and its encoders is about five times cheaper per log record (measured:
~29 µs against ~140 µs for a pod-to-pod flow with its Hubble body as a map) and about
three times per data point, which decides whether a node agent can log every flow.

Flow-log records, one per :class:`Flow`:

- body: the object ``hubble observe -o json`` prints under ``"flow"``
  (:func:`flowtel.hubble.flow_to_dict`), as an OTLP map (``kvlist``) so Collector
  processors and backends can address fields (``body["verdict"]``) without parsing; or,
  with ``log_body: json``, the same object as one compact JSON string;
- attributes: ``source.address``, ``source.port``, ``destination.address``,
  ``destination.port`` (ports only for TCP, UDP and SCTP), ``network.transport`` (the
  lowercase IANA keyword: ``tcp``, ``udp``, ``icmp``, ``ipv6-icmp``, ``sctp``),
  ``network.type`` (``ipv4``/``ipv6``), ``network.interface.name``, and each end's
  Kubernetes attributes prefixed with its side: ``source.k8s.pod.name``,
  ``destination.k8s.namespace.name``, … (from the endpoint's OTel attributes, plus its
  namespace and pod name when those are not already there);
- severity INFO, or WARN for verdicts DROPPED and ERROR; time = the flow's time;
  event name ``flowtel.flow``.

:class:`LostEvents` become WARN records named ``flowtel.lost_events`` whose body is
Hubble's ``LostEvent`` object and whose attribute ``flowtel.lost_events.source`` says where.
"""
from __future__ import annotations

import json
import math
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, SeverityNumber
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    HistogramDataPoint,
    NumberDataPoint,
    ScopeMetrics,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.sdk.resources import OTELResourceDetector

from exporters.common.series import FamilySnapshot, HistogramValue, Temporality
from flowtel import hubble
from flowtel.records import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Endpoint,
    Flow,
    LostEvents,
    MetricKind,
    Record,
    Verdict,
)

LogBody = Literal["map", "json"]

try:
    FLOWTEL_VERSION = version("flowtel")
except PackageNotFoundError:  # running from a tree that was never installed
    FLOWTEL_VERSION = "0.0.0"

_TRANSPORT = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp", IPPROTO_ICMPV6: "ipv6-icmp",
              IPPROTO_SCTP: "sctp"}
_PORTED = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP)
_WARN_VERDICTS = (Verdict.DROPPED, Verdict.ERROR)
_TEMPORALITY = {"cumulative": AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE,
                "delta": AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA}
_INT64_MAX = 2**63 - 1
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def resource_attributes(node_name: str) -> dict[str, str]:
    """``service.name=flowtel`` and ``k8s.node.name``, with OTEL_RESOURCE_ATTRIBUTES and
    OTEL_SERVICE_NAME honoured as every OTel SDK does (e.g. ``k8s.cluster.name`` set there)."""
    attributes: dict[str, str] = {"service.name": "flowtel", "service.version": FLOWTEL_VERSION}
    attributes.update({k: str(v) for k, v in OTELResourceDetector().detect().attributes.items()})
    if node_name:
        attributes["k8s.node.name"] = node_name
    return attributes


def _resource(attributes: Mapping[str, str]) -> Resource:
    resource = Resource()
    for key, value in attributes.items():
        kv = resource.attributes.add()
        kv.key = key
        kv.value.string_value = value
    return resource


def _scope() -> InstrumentationScope:
    return InstrumentationScope(name="flowtel", version=FLOWTEL_VERSION)


def fill_any_value(target: AnyValue, value: object) -> None:
    """Set an AnyValue from JSON-like Python data (dicts become ``kvlist``, lists arrays)."""
    if isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bool):  # before int: bool is an int subclass
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, dict):
        values = target.kvlist_value.values
        for key, item in value.items():
            kv = values.add()
            kv.key = key
            fill_any_value(kv.value, item)
    elif isinstance(value, (list, tuple)):
        array = target.array_value.values
        for item in value:
            fill_any_value(array.add(), item)
    elif value is None:
        pass  # an empty AnyValue is OTLP's null
    else:
        target.string_value = str(value)


def any_value_to_python(value: AnyValue) -> object:
    """The inverse of :func:`fill_any_value` (tests and debugging read requests back)."""
    which = value.WhichOneof("value")
    if which == "kvlist_value":
        return {kv.key: any_value_to_python(kv.value) for kv in value.kvlist_value.values}
    if which == "array_value":
        return [any_value_to_python(v) for v in value.array_value.values]
    if which is None:
        return None
    return getattr(value, which)


def _add_str(attributes: object, key: str, value: str) -> None:
    kv: KeyValue = attributes.add()  # type: ignore[attr-defined]
    kv.key = key
    kv.value.string_value = value


def _add_int(attributes: object, key: str, value: int) -> None:
    kv: KeyValue = attributes.add()  # type: ignore[attr-defined]
    kv.key = key
    kv.value.int_value = value


def _add_endpoint(attributes: object, side: str, ep: Endpoint | None) -> None:
    if ep is None:
        return
    k8s = ep.attributes
    for key, value in k8s.items():
        _add_str(attributes, f"{side}.{key}", value)
    if ep.namespace and "k8s.namespace.name" not in k8s:
        _add_str(attributes, f"{side}.k8s.namespace.name", ep.namespace)
    if ep.pod_name and "k8s.pod.name" not in k8s:
        _add_str(attributes, f"{side}.k8s.pod.name", ep.pod_name)


def _fill_flow(pb: LogRecord, flow: Flow, body: LogBody, observed_ns: int,
               body_mask: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    pb.time_unix_nano = flow.time_ns
    pb.observed_time_unix_nano = observed_ns
    if flow.verdict in _WARN_VERDICTS:
        pb.severity_number = SeverityNumber.SEVERITY_NUMBER_WARN
        pb.severity_text = "WARN"
    else:
        pb.severity_number = SeverityNumber.SEVERITY_NUMBER_INFO
        pb.severity_text = "INFO"
    pb.event_name = "flowtel.flow"
    obj = hubble.flow_to_dict(flow)
    if body_mask is not None:
        obj = body_mask(obj)
    if body == "map":
        fill_any_value(pb.body, obj)
    else:
        pb.body.string_value = _encode_json(obj)
    attrs = pb.attributes
    if flow.ip_version:
        ported = flow.protocol in _PORTED
        if flow.src_ip:
            _add_str(attrs, "source.address", flow.src_ip)
        if ported:
            _add_int(attrs, "source.port", flow.src_port)
        if flow.dst_ip:
            _add_str(attrs, "destination.address", flow.dst_ip)
        if ported:
            _add_int(attrs, "destination.port", flow.dst_port)
        transport = _TRANSPORT.get(flow.protocol)
        if transport:
            _add_str(attrs, "network.transport", transport)
        _add_str(attrs, "network.type", "ipv6" if flow.ip_version == 6 else "ipv4")
    if flow.ifname:
        _add_str(attrs, "network.interface.name", flow.ifname)
    _add_endpoint(attrs, "source", flow.source)
    _add_endpoint(attrs, "destination", flow.destination)


def _fill_lost(pb: LogRecord, lost: LostEvents, body: LogBody, observed_ns: int) -> None:
    pb.time_unix_nano = lost.time_ns
    pb.observed_time_unix_nano = observed_ns
    pb.severity_number = SeverityNumber.SEVERITY_NUMBER_WARN
    pb.severity_text = "WARN"
    pb.event_name = "flowtel.lost_events"
    obj = hubble.lost_to_dict(lost)
    if body == "map":
        fill_any_value(pb.body, obj)
    else:
        pb.body.string_value = _encode_json(obj)
    _add_str(pb.attributes, "flowtel.lost_events.source", lost.source)


class OtlpEncoder:
    """Encodes batches into serialized OTLP export requests of at most ``max_batch_size`` items."""

    def __init__(self, resource: Mapping[str, str], max_batch_size: int, log_body: LogBody = "map",
                 body_mask: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._resource = _resource(resource)
        self._scope = _scope()
        self.max_batch_size = max_batch_size
        self.log_body: LogBody = log_body
        # Applied to each flow's Hubble object (the field mask); attributes are not affected.
        self.body_mask = body_mask

    def logs(self, records: Sequence[Record], observed_ns: int) -> Iterator[tuple[bytes, int]]:
        """(serialized ExportLogsServiceRequest, number of log records) per chunk."""
        for start in range(0, len(records), self.max_batch_size):
            chunk = records[start:start + self.max_batch_size]
            request = ExportLogsServiceRequest()
            resource_logs = request.resource_logs.add()
            resource_logs.resource.CopyFrom(self._resource)
            scope_logs = resource_logs.scope_logs.add()
            scope_logs.scope.CopyFrom(self._scope)
            out = scope_logs.log_records
            body = self.log_body
            body_mask = self.body_mask
            for record in chunk:
                if isinstance(record, Flow):
                    _fill_flow(out.add(), record, body, observed_ns, body_mask)
                elif isinstance(record, LostEvents):
                    _fill_lost(out.add(), record, body, observed_ns)
                else:
                    raise TypeError(f"not a flow-log record: {type(record).__name__}")
            yield request.SerializeToString(), len(chunk)

    def metrics(self, families: Sequence[FamilySnapshot], temporality: Temporality,
                now_ns: int) -> Iterator[tuple[bytes, int]]:
        """(serialized ExportMetricsServiceRequest, number of data points) per chunk.

        A metric with more points than fit in one request continues in the next one, under
        the same name and type: receivers merge them by identity.
        """
        temporality_pb = _TEMPORALITY[temporality]
        request, scope_metrics, count = self._new_metrics_request()
        for family in families:
            points = family.points
            i = 0
            while i < len(points):
                room = self.max_batch_size - count
                if room == 0:
                    yield request.SerializeToString(), count
                    request, scope_metrics, count = self._new_metrics_request()
                    room = self.max_batch_size
                part = points[i:i + room]
                i += len(part)
                metric = scope_metrics.metrics.add()
                metric.name = family.name
                if family.description:
                    metric.description = family.description
                if family.unit:
                    metric.unit = family.unit
                if family.kind is MetricKind.SUM:
                    metric.sum.is_monotonic = True
                    metric.sum.aggregation_temporality = temporality_pb
                    data_points = metric.sum.data_points
                    for attributes, value, start_ns in part:
                        _fill_point(data_points.add(), attributes, value, start_ns, now_ns)  # type: ignore[arg-type]
                elif family.kind is MetricKind.HISTOGRAM:
                    metric.histogram.aggregation_temporality = temporality_pb
                    histogram_points = metric.histogram.data_points
                    for attributes, value, start_ns in part:
                        _fill_histogram_point(histogram_points.add(), attributes, value, start_ns,  # type: ignore[arg-type]
                                              now_ns)
                else:
                    data_points = metric.gauge.data_points
                    for attributes, value, _start in part:
                        _fill_point(data_points.add(), attributes, value, 0, now_ns)  # type: ignore[arg-type]
                count += len(part)
        if count:
            yield request.SerializeToString(), count

    def _new_metrics_request(self) -> tuple[ExportMetricsServiceRequest, ScopeMetrics, int]:
        request = ExportMetricsServiceRequest()
        resource_metrics = request.resource_metrics.add()
        resource_metrics.resource.CopyFrom(self._resource)
        scope_metrics = resource_metrics.scope_metrics.add()
        scope_metrics.scope.CopyFrom(self._scope)
        return request, scope_metrics, 0


def _fill_point(dp: NumberDataPoint, attributes: Mapping[str, str], value: float, start_ns: int,
                now_ns: int) -> None:
    if start_ns:
        dp.start_time_unix_nano = start_ns
    dp.time_unix_nano = now_ns
    # Counters are integers; sending them as integers keeps them exact past 2**53.
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer()):
        as_int = int(value)
        if -_INT64_MAX - 1 <= as_int <= _INT64_MAX:
            dp.as_int = as_int
        else:
            dp.as_double = float(value)
    else:
        dp.as_double = value
    attrs = dp.attributes
    for key, item in attributes.items():
        kv = attrs.add()
        kv.key = key
        kv.value.string_value = item


def _fill_histogram_point(dp: HistogramDataPoint, attributes: Mapping[str, str], value: HistogramValue,
                          start_ns: int, now_ns: int) -> None:
    if start_ns:
        dp.start_time_unix_nano = start_ns
    dp.time_unix_nano = now_ns
    dp.count = value.count
    dp.sum = value.sum
    dp.bucket_counts.extend(value.bucket_counts)
    dp.explicit_bounds.extend(value.bounds)
    attrs = dp.attributes
    for key, item in attributes.items():
        kv = attrs.add()
        kv.key = key
        kv.value.string_value = item
