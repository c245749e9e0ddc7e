"""Flow-log records to OTLP log requests, built in place on opentelemetry-proto's messages.

Metrics do not come through here: they leave as the SDK's ``MetricsData``
(:mod:`flowtel.lib.exporterhelper.metrics_data`) through opentelemetry-exporter-otlp's exporters.
Logs are encoded here, and the ready request is handed to the SDK's ``OTLPLogExporter``
classes for sending, because building the messages directly (``add()`` on repeated fields)
costs a fraction of going through the SDK's log data model (``LogRecord`` +
``ReadableLogRecord`` + ``encode_logs``) per record; ``python -m bench.exporters`` measures
both in one run (docs/performance.md §7), which decides whether a node agent can log every
flow.

Flow-log records, one per :class:`Flow`:

- body: the object ``hubble observe -o json`` prints under ``"flow"``
  (:func:`flowtel.lib.hubble.convert.flow_json`), as an OTLP map (``kvlist``) so Collector
  processors and backends can address fields (``body["verdict"]``) without parsing; or,
  with ``log_body: json``, the same object as one compact JSON string;
- attributes: ``source.address``, ``source.port``, ``destination.address``,
  ``destination.port`` (ports only for TCP, UDP and SCTP), ``network.transport`` (the
  lowercase IANA keyword: ``tcp``, ``udp``, ``icmp``, ``ipv6-icmp``, ``sctp``),
  ``network.type`` (``ipv4``/``ipv6``), ``network.interface.name``, and each end's
  Kubernetes attributes prefixed with its side: ``source.k8s.pod.name``,
  ``destination.k8s.namespace.name``, … (from the endpoint's OTel attributes, plus its
  namespace and pod name when those are not already there); a ``field_mask`` keeps only
  the attributes whose body field it keeps (table in :mod:`flowtel.lib.exporterhelper.flowlog_filter`);
- severity INFO, or WARN for verdicts DROPPED and ERROR; time = the flow's time;
  event name ``flowtel.flow``.

:class:`LostEvents` become WARN records named ``flowtel.lost_events`` whose body is
Hubble's ``LostEvent`` object and whose attribute ``flowtel.lost_events.source`` says where.
"""
from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterator, Literal, Mapping, Sequence

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, SeverityNumber
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.sdk.resources import OTELResourceDetector

from flowtel.lib.exporterhelper.flowlog_filter import FieldMask
from flowtel.lib.hubble import convert
from flowtel.records import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Endpoint,
    Flow,
    LostEvents,
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
        # Present even when empty: an empty map is ``{}`` (Hubble's ``"flags": {}`` of a TCP flow
        # with no flags, ``"ethernet": {}``), not OTLP's null, which an unset value would read as.
        if not value:
            target.kvlist_value.SetInParent()
        values = target.kvlist_value.values
        for key, item in value.items():
            kv = values.add()
            kv.key = key
            fill_any_value(kv.value, item)
    elif isinstance(value, (list, tuple)):
        if not value:
            target.array_value.SetInParent()  # [] stays an empty array, as above
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


def _add_str(attributes: Any, key: str, value: str) -> None:
    kv: KeyValue = attributes.add()  # a protobuf repeated field (its container type is private)
    kv.key = key
    kv.value.string_value = value


def _add_int(attributes: Any, key: str, value: int) -> None:
    kv: KeyValue = attributes.add()  # a protobuf repeated field (its container type is private)
    kv.key = key
    kv.value.int_value = value


def _endpoint_attributes(out: dict[str, str | int], side: str, ep: Endpoint | None) -> None:
    if ep is None:
        return
    k8s = ep.attributes
    for key, value in k8s.items():
        out[f"{side}.{key}"] = value
    if ep.namespace and "k8s.namespace.name" not in k8s:
        out[f"{side}.k8s.namespace.name"] = ep.namespace
    if ep.pod_name and "k8s.pod.name" not in k8s:
        out[f"{side}.k8s.pod.name"] = ep.pod_name


def flow_attributes(flow: Flow) -> dict[str, str | int]:
    """A flow-log record's OTel attributes, in order (ports only for TCP, UDP and SCTP)."""
    out: dict[str, str | int] = {}
    if flow.ip_version:
        ported = flow.protocol in _PORTED
        if flow.src_ip:
            out["source.address"] = flow.src_ip
        if ported:
            out["source.port"] = flow.src_port
        if flow.dst_ip:
            out["destination.address"] = flow.dst_ip
        if ported:
            out["destination.port"] = flow.dst_port
        transport = _TRANSPORT.get(flow.protocol)
        if transport:
            out["network.transport"] = transport
        out["network.type"] = "ipv6" if flow.ip_version == 6 else "ipv4"
    if flow.ifname:
        out["network.interface.name"] = flow.ifname
    _endpoint_attributes(out, "source", flow.source)
    _endpoint_attributes(out, "destination", flow.destination)
    return out


def flow_severity(flow: Flow) -> tuple[SeverityNumber.ValueType, str]:
    """(OTLP severity number, text): WARN for verdicts DROPPED and ERROR, else INFO."""
    if flow.verdict in _WARN_VERDICTS:
        return SeverityNumber.SEVERITY_NUMBER_WARN, "WARN"
    return SeverityNumber.SEVERITY_NUMBER_INFO, "INFO"


def _fill_flow(pb: LogRecord, flow: Flow, body: LogBody, observed_ns: int,
               body_mask: FieldMask | None = None) -> None:
    pb.time_unix_nano = flow.time_ns
    pb.observed_time_unix_nano = observed_ns
    pb.severity_number, pb.severity_text = flow_severity(flow)
    pb.event_name = "flowtel.flow"
    obj = convert.flow_json(flow)
    if body_mask is not None:
        obj = body_mask(obj)
    if body == "map":
        fill_any_value(pb.body, obj)
    elif body_mask is None:
        pb.body.string_value = convert.flow_text(flow)  # the record's shared, once-encoded text
    else:
        pb.body.string_value = _encode_json(obj)
    attrs = pb.attributes
    for key, value in flow_attributes(flow).items():
        # The field mask hides an attribute with the body field it repeats (flowlog_filter).
        if body_mask is not None and not body_mask.keeps_attribute(key, flow.protocol):
            continue
        if isinstance(value, int):
            _add_int(attrs, key, value)
        else:
            _add_str(attrs, key, value)


def _fill_lost(pb: LogRecord, lost: LostEvents, body: LogBody, observed_ns: int) -> None:
    pb.time_unix_nano = lost.time_ns
    pb.observed_time_unix_nano = observed_ns
    pb.severity_number = SeverityNumber.SEVERITY_NUMBER_WARN
    pb.severity_text = "WARN"
    pb.event_name = "flowtel.lost_events"
    obj = convert.lost_json(lost)
    if body == "map":
        fill_any_value(pb.body, obj)
    else:
        pb.body.string_value = _encode_json(obj)
    _add_str(pb.attributes, "flowtel.lost_events.source", lost.source)


class OtlpEncoder:
    """Encodes flow-log batches into serialized OTLP log requests of at most ``max_batch_size`` records."""

    def __init__(self, resource: Mapping[str, str], max_batch_size: int, log_body: LogBody = "map",
                 body_mask: FieldMask | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._resource = _resource(resource)
        self._scope = _scope()
        self.max_batch_size = max_batch_size
        self.log_body: LogBody = log_body
        # The field mask: applied to each flow's Hubble object and to the attributes derived
        # from its fields (flowtel/lib/exporterhelper/flowlog_filter.py).
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
