"""Records on Cilium's wire: a :class:`~flowtel.records.Flow` as a ``flow.Flow`` message and
as that message's proto3 JSON mapping, and back.

Every JSON form flowtel writes (file exporter, ``flowtel observe -o json``, OTLP log bodies,
the flow API, the DNS proxy's flow log) is what ``json_format.MessageToDict`` /
``protojson`` make of the message (proto field names), so it parses strictly with
Cilium's own ``.proto`` files. The JSON is built directly (:func:`flow_json`, a dict of
plain values), because going through the message costs ~10x more per record; tests
prove the two identical for every kind of record. The message itself (:func:`to_proto`)
is built from that dict (:mod:`flowtel.lib.hubble.message`, field by field rather than
through ``ParseDict``'s reflection), so there is one mapping.

Each record's form is built once, on first use, and kept on the record
(``Flow.wire_memo``): every consumer of the same record (the file exporter, OTLP, the flow
API's ring, ``hubble``'s gRPC server) shares it, and they all see the same ``uuid``.
Dicts returned here are shared: treat them as read-only.

How flowtel's records map onto the message (the README's "Flows on Hubble's wire"):

- ``PACKET``: ``Type: L3_L4``, ``event_type {type: 4 (trace), sub_type: 5 FROM_ENDPOINT |
  0 TO_ENDPOINT}`` from ``traffic_direction`` (flowtel counts at the pod's host-side
  interface), counts in ``extensions`` (``packets``, ``bytes``, ``tcp_flags``).
- ``DROP``: ``verdict: DROPPED``, ``drop_reason_desc`` = the Cilium ``DropReason`` of the
  same event (``recordtables.KERNEL_TO_CILIUM_DROP``; ``DROP_REASON_UNKNOWN``, i.e.
  omitted, otherwise), ``event_type {type: 1, sub_type: <its number>}``, the kernel's exact
  reason in ``extensions.drop_reason``. ``AUDIT`` drops (would-be denials) are policy
  verdict events, ``event_type {type: 5}``.
- ``DROP_SAMPLE`` (one drop emitted on its own, ``drops.events_per_second``): as a drop,
  with ``extensions.drop_sample: true`` and no packet counts (a drop flow counts it).
- DNS: ``Type: L7``, ``event_type {type: 129}``, ``l7 {type: REQUEST|RESPONSE, latency_ns,
  dns}``. An unanswered query has verdict ``ERROR`` (as Cilium's proxy reports a query
  whose upstream failed), no ``l7.type`` and no ``is_reply``, and
  ``extensions.dns_unanswered: true``.
- TCP socket events: ``Type: SOCK``, ``event_type {type: 7 (trace-sock)}``, verdict
  ``TRACED``, no packet counts, ``extensions.tcp_event``.
- every flow: ``uuid``, ``emitter {name: flowtel, version}``; lost events map their source
  onto Cilium's ``LostEventSource`` (``recordtables.cilium_lost_source``).
"""
from __future__ import annotations

import itertools
import json as _json
import math
import random
import threading
from importlib import metadata
from typing import Any, Mapping

import orjson
from google.protobuf import json_format
from google.protobuf import struct_pb2  # noqa: F401  # registers google.protobuf.Struct, the type extensions wrap

from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.lib.hubble.message import flow_message
from flowtel.lib.hubble.summary import summary
from flowtel.lib.hubble.timefmt import format_time
from flowtel.records import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    DnsInfo,
    Endpoint,
    EventKind,
    Flow,
    LostEvents,
    Record,
    TrafficDirection,
    Verdict,
)
from flowtel.recordtables import (
    CILIUM_DROP_REASONS,
    MESSAGE_TYPE_ACCESS_LOG,
    MESSAGE_TYPE_DROP,
    MESSAGE_TYPE_POLICY_VERDICT,
    MESSAGE_TYPE_TRACE,
    MESSAGE_TYPE_TRACE_SOCK,
    TCP_FLAG_NAMES,
    TRACE_FROM_ENDPOINT,
    cilium_drop_reason,
    cilium_lost_source,
    drop_sub_type,
)

STRUCT_TYPE_URL = "type.googleapis.com/google.protobuf.Struct"
EMITTER_NAME = "flowtel"


def _version() -> str:
    try:
        return metadata.version("flowtel")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


# Shared by every flow's JSON (read-only by contract, like every dict returned here).
EMITTER: dict[str, str] = {"name": EMITTER_NAME, "version": _version()}

_FLAG_NAMES = tuple(tuple(n for bit, n in TCP_FLAG_NAMES if b & bit) for b in range(256))
# Shared by every flow with the same flags (JSON encoders need real dicts; read-only by contract).
_FLAG_DICTS = tuple({n: True for n in names} for names in _FLAG_NAMES)

# Flow ids in uuid4 form: 74 random bits drawn once per process (from the OS) and a 48-bit
# counter. They must be unique, not secret; uuid.uuid4() per record costs ~10x more.
_rng = random.SystemRandom()
_UUID_HEAD = "%08x-%04x-4%03x-%x%03x-" % (_rng.getrandbits(32), _rng.getrandbits(16), _rng.getrandbits(12),
                                          8 | _rng.getrandbits(2), _rng.getrandbits(12))
_uuid_counter = itertools.count(_rng.getrandbits(40))
_memo_lock = threading.Lock()


def new_uuid() -> str:
    return f"{_UUID_HEAD}{next(_uuid_counter) & 0xFFFFFFFFFFFF:012x}"


class WireForm:
    """A record's Hubble forms, built once: its JSON mapping, and on demand its compact JSON
    text (bytes, and str for the consumers that want one) and the message."""

    __slots__ = ("json", "_ends", "_bytes", "_text", "_proto")

    def __init__(self, json: dict[str, Any], ends: tuple[Endpoint | None, Endpoint | None] = (None, None)) -> None:
        self.json = json
        self._ends = ends  # the records' shared endpoints, whose JSON text is encoded once each
        self._bytes: bytes | None = None
        self._text: str | None = None
        self._proto: flow_pb2.Flow | None = None

    def text_bytes(self) -> bytes:
        """The JSON mapping as compact UTF-8 JSON (what every line-oriented consumer writes)."""
        data = self._bytes
        if data is None:
            data = self._bytes = _encode_flow(self.json, self._ends)
        return data

    def text(self) -> str:
        text = self._text
        if text is None:
            text = self._text = self.text_bytes().decode()
        return text

    def proto(self) -> flow_pb2.Flow:
        proto = self._proto
        if proto is None:
            proto = self._proto = flow_message(self.json)
        return proto


def wire_form(flow: Flow) -> WireForm:
    """The record's shared :class:`WireForm` (built on first use, by whichever thread asks)."""
    memo = flow.wire_memo
    form: WireForm | None = memo.form
    if form is not None:
        return form
    built = WireForm(_flow_dict(flow), (flow.source, flow.destination))
    with _memo_lock:
        form = memo.form
        if form is None:  # two threads may build it; one wins, so every consumer sees one uuid
            memo.form = form = built
    return form


def flow_json(flow: Flow) -> dict[str, Any]:
    """The ``flow.Flow`` message's proto3 JSON mapping (proto field names): what
    ``hubble observe -o json`` prints under ``"flow"``. Shared: do not change it."""
    form: WireForm | None = flow.wire_memo.form
    return form.json if form is not None else wire_form(flow).json


def to_proto(flow: Flow) -> flow_pb2.Flow:
    """The record as a ``flow.Flow`` message (shared: copy it before changing it)."""
    return wire_form(flow).proto()


# -- the JSON mapping ---------------------------------------------------------------------

def _ports(flow: Flow) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if flow.src_port:
        out["source_port"] = flow.src_port
    if flow.dst_port:
        out["destination_port"] = flow.dst_port
    return out


def _l4(flow: Flow) -> dict[str, Any] | None:
    proto = flow.protocol
    if proto == IPPROTO_TCP:
        tcp = _ports(flow)
        # Hubble's L7 flows come from the proxy and carry no flags; packet flows always do.
        if not flow.kind.is_dns:
            tcp["flags"] = _FLAG_DICTS[flow.tcp_flags & 0xFF]
        return {"TCP": tcp}
    if proto == IPPROTO_UDP:
        return {"UDP": _ports(flow)}
    if proto == IPPROTO_ICMP or proto == IPPROTO_ICMPV6:
        icmp: dict[str, int] = {}
        if flow.src_port:
            icmp["type"] = flow.src_port
        if flow.dst_port:
            icmp["code"] = flow.dst_port
        return {"ICMPv4" if proto == IPPROTO_ICMP else "ICMPv6": icmp}
    if proto == IPPROTO_SCTP:
        return {"SCTP": _ports(flow)}
    return None


class _EndpointForm:
    """An endpoint's JSON mapping and, once asked for, its encoded text."""

    __slots__ = ("json", "_fragment")

    def __init__(self, json: dict[str, Any]) -> None:
        self.json = json
        self._fragment: orjson.Fragment | None = None

    def fragment(self) -> orjson.Fragment:
        frag = self._fragment
        if frag is None:
            frag = self._fragment = orjson.Fragment(_kept(_dumps(self.json)))
        return frag


def _endpoint_form(ep: Endpoint) -> _EndpointForm:
    memo: _EndpointForm | None = ep.json_memo
    if memo is None:
        memo = _EndpointForm(_endpoint_json(ep))
        object.__setattr__(ep, "json_memo", memo)  # a memo of the frozen fields, not a change
    return memo


def endpoint_json(ep: Endpoint) -> dict[str, Any]:
    """An ``Endpoint`` message; flowtel has no Cilium endpoint ``ID``, so none is emitted.

    Built once per endpoint object: enrichment shares one object among every record of a pod.
    """
    return _endpoint_form(ep).json


def _endpoint_json(ep: Endpoint) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ep.identity:
        out["identity"] = ep.identity
    if ep.namespace:
        out["namespace"] = ep.namespace
    if ep.labels:
        out["labels"] = list(ep.labels)
    if ep.pod_name:
        out["pod_name"] = ep.pod_name
    if ep.workloads:
        workloads = []
        for w in ep.workloads:
            wd: dict[str, str] = {}
            if w.name:
                wd["name"] = w.name
            if w.kind:
                wd["kind"] = w.kind
            workloads.append(wd)
        out["workloads"] = workloads
    if ep.cluster_name:
        out["cluster_name"] = ep.cluster_name
    return out


def _dns_json(dns: DnsInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if dns.query:
        out["query"] = dns.query
    if dns.ips:
        out["ips"] = list(dns.ips)
    if dns.ttl:
        out["ttl"] = dns.ttl
    if dns.cnames:
        out["cnames"] = list(dns.cnames)
    if dns.observation_source:
        out["observation_source"] = dns.observation_source
    if dns.rcode:
        out["rcode"] = dns.rcode
    if dns.qtypes:
        out["qtypes"] = list(dns.qtypes)
    if dns.rrtypes:
        out["rrtypes"] = list(dns.rrtypes)
    return out


def _struct_value(value: Any) -> Any:
    """A value as a ``google.protobuf.Value`` JSON (the record's read-only mappings → dicts)."""
    if value is None or value.__class__ in (str, bool, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"extensions value {value!r} is not a finite number (google.protobuf.Value)")
        return value
    if isinstance(value, (tuple, list)):
        return [_struct_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _struct_value(v) for k, v in value.items()}
    if isinstance(value, (str, int)):  # enum members with str/int values
        return value.value if hasattr(value, "value") else value
    raise TypeError(f"extensions value of type {type(value).__name__} has no google.protobuf.Value form")


def _extensions(flow: Flow, kind: EventKind) -> dict[str, Any]:
    ext: dict[str, Any] = {}
    for key, value in flow.extensions.items():
        ext[key] = _struct_value(value)
    if flow.is_packets and (flow.packets or flow.bytes):
        ext["packets"] = flow.packets
        ext["bytes"] = flow.bytes
    counts = flow.tcp_flag_counts
    if counts is not None:
        ext["tcp_flags"] = counts.as_dict()
    if flow.drop_reason:
        ext["drop_reason"] = flow.drop_reason  # the exact reason (kernel's or flowtel's datapath's)
    if kind.is_tcp_event:
        ext["tcp_event"] = kind.value
    elif kind is EventKind.DNS_UNANSWERED:
        ext["dns_unanswered"] = True
    elif kind is EventKind.DROP_SAMPLE:
        # One drop on its own, also counted by a drop flow record: no packets/bytes here, so a
        # consumer summing Retina's counts in extensions does not count it twice.
        ext["drop_sample"] = True
    if flow.ip_version == 0:
        ext["ethertype"] = f"0x{flow.ethertype:04x}"
    return ext


# Parts that many records share, built once (read-only by contract, like EMITTER).
_EVENT_ACCESS_LOG: dict[str, int] = {"type": MESSAGE_TYPE_ACCESS_LOG}
_EVENT_TRACE_SOCK: dict[str, int] = {"type": MESSAGE_TYPE_TRACE_SOCK}
_EVENT_POLICY_VERDICT: dict[str, int] = {"type": MESSAGE_TYPE_POLICY_VERDICT}
_EVENT_FROM_ENDPOINT: dict[str, int] = {"type": MESSAGE_TYPE_TRACE, "sub_type": TRACE_FROM_ENDPOINT}
_EVENT_TRACE: dict[str, int] = {"type": MESSAGE_TYPE_TRACE}
_drop_event_types: dict[str, dict[str, int]] = {}
_interfaces: dict[tuple[int, str], dict[str, Any]] = {}


def _drop_event_type(reason: str) -> dict[str, int]:
    et = _drop_event_types.get(reason)
    if et is None:
        et = {"type": MESSAGE_TYPE_DROP, "sub_type": drop_sub_type(reason)}
        if len(_drop_event_types) < 4096:  # reasons are a small fixed set; the bound is for hostile input
            _drop_event_types[reason] = et
    return et


def _interface_json(ifindex: int, ifname: str) -> dict[str, Any]:
    key = (ifindex, ifname)
    iface = _interfaces.get(key)
    if iface is None:
        iface = {}
        if ifindex:
            iface["index"] = ifindex
        if ifname:
            iface["name"] = ifname
        if len(_interfaces) >= 65536:
            _interfaces.clear()  # interfaces churn (pods come and go): start again rather than grow
        _interfaces[key] = iface
    return iface


def _flow_dict(flow: Flow) -> dict[str, Any]:
    kind = flow.kind
    is_dns = kind.is_dns
    is_tcp_event = kind.is_tcp_event
    verdict = flow.verdict
    out: dict[str, Any] = {"time": format_time(flow.time_ns), "uuid": new_uuid(), "emitter": EMITTER}
    if verdict is not Verdict.VERDICT_UNKNOWN:
        out["verdict"] = verdict._value_
    cilium_reason = ""
    if verdict is Verdict.DROPPED and flow.drop_reason:
        cilium_reason = cilium_drop_reason(flow.drop_reason)
        if cilium_reason != "DROP_REASON_UNKNOWN":
            out["drop_reason"] = CILIUM_DROP_REASONS[cilium_reason]  # deprecated numeric twin
    if flow.ip_version == 0:
        out["ethernet"] = {}
    else:
        out["IP"] = {
            "source": flow.src_ip,
            "destination": flow.dst_ip,
            "ipVersion": "IPv6" if flow.ip_version == 6 else "IPv4",
        }
        l4 = _l4(flow)
        if l4 is not None:
            out["l4"] = l4
    if flow.source is not None:
        out["source"] = endpoint_json(flow.source)
    if flow.destination is not None:
        out["destination"] = endpoint_json(flow.destination)
    out["Type"] = "L7" if is_dns else "SOCK" if is_tcp_event else "L3_L4"
    if flow.node_name:
        out["node_name"] = flow.node_name
    if flow.source_names:
        out["source_names"] = list(flow.source_names)
    if flow.destination_names:
        out["destination_names"] = list(flow.destination_names)
    if is_dns:
        l7: dict[str, Any] = {}
        l7_type = flow.l7_type
        if l7_type:
            l7["type"] = l7_type
        if flow.latency_ns:
            l7["latency_ns"] = str(flow.latency_ns)  # uint64: a string in protojson
        if flow.l7 is not None:
            l7["dns"] = _dns_json(flow.l7)
        out["l7"] = l7
    is_reply = flow.is_reply if kind is not EventKind.DNS_UNANSWERED else None
    if is_reply:
        out["reply"] = True  # deprecated twin of is_reply that Hubble still fills

    direction = flow.traffic_direction
    observation_point = None
    if is_dns:
        out["event_type"] = _EVENT_ACCESS_LOG
    elif is_tcp_event:
        out["event_type"] = _EVENT_TRACE_SOCK
    elif verdict is Verdict.DROPPED:
        out["event_type"] = _drop_event_type(flow.drop_reason)
    elif verdict is Verdict.AUDIT:
        out["event_type"] = _EVENT_POLICY_VERDICT
    elif direction is TrafficDirection.EGRESS:
        out["event_type"] = _EVENT_FROM_ENDPOINT
        observation_point = "FROM_ENDPOINT"
    elif direction is TrafficDirection.INGRESS:
        out["event_type"] = _EVENT_TRACE  # sub_type TO_ENDPOINT is 0: omitted
        observation_point = "TO_ENDPOINT"
    else:
        out["event_type"] = _EVENT_TRACE
    if direction is not TrafficDirection.UNKNOWN:
        out["traffic_direction"] = direction._value_
    if observation_point is not None:
        out["trace_observation_point"] = observation_point
    if cilium_reason and cilium_reason != "DROP_REASON_UNKNOWN":
        out["drop_reason_desc"] = cilium_reason
    if is_reply is not None:
        out["is_reply"] = is_reply
    if flow.ifindex or flow.ifname:
        out["interface"] = _interface_json(flow.ifindex, flow.ifname)
    out["Summary"] = summary(flow)
    ext = _extensions(flow, kind)
    if ext:
        out["extensions"] = {"@type": STRUCT_TYPE_URL, "value": ext}
    return out


# -- envelopes (observer.GetFlowsResponse) ---------------------------------------------------

# JSON text comes from orjson: ≈ 4x faster than the standard library's encoder on a flow
# (bench/throughput.py, docs/performance.md §3), the same mapping (key order kept, compact).
# Unlike ``json`` it writes non-ASCII characters as UTF-8 rather than \\u escapes (the same
# JSON), and it refuses strings with lone surrogates, which the standard library escapes:
# those (and ints beyond 64 bits) go through the standard library, so nothing that encoded
# before fails now.
_dumps = orjson.dumps
_stdlib = _json.JSONEncoder(separators=(",", ":")).encode


def _kept(data: bytes) -> bytes:
    """A right-sized copy of orjson output that outlives the call.

    orjson (3.12 on) returns bytes whose allocation is its growing write buffer, never shrunk:
    ≥ 4 KB for a 240-byte flow, 8 KB for a 1.5 KB one (tracemalloc). A form cached on a record
    lives as long as the record: in every queue it waits in and in the Hubble ring (4095
    flows, 33 MB of such buffers measured in the agent). The copy costs ≈ 0.6 µs.
    """
    return bytes(memoryview(data))


def _encode(obj: Any) -> bytes:
    try:
        return _dumps(obj)
    except orjson.JSONEncodeError:
        return _stdlib(obj).encode()


def encode_json(obj: Any) -> bytes:
    """Any JSON mapping built here (or a masked copy of one) as compact UTF-8 JSON."""
    return _encode(obj)


def _compact(obj: Any) -> str:
    return _encode(obj).decode()


def _encode_flow(body: dict[str, Any], ends: tuple[Endpoint | None, Endpoint | None]) -> bytes:
    source, destination = ends
    try:
        if source is None and destination is None:
            return _kept(_dumps(body))
        # The endpoints' text is encoded once per endpoint object and spliced in: they are
        # most of a flow's bytes, and shared by every record of the same pods.
        spliced = dict(body)
        if source is not None:
            spliced["source"] = _endpoint_form(source).fragment()
        if destination is not None:
            spliced["destination"] = _endpoint_form(destination).fragment()
        return _kept(_dumps(spliced))
    except orjson.JSONEncodeError:
        return _stdlib(body).encode()


def envelope_bytes(record: Record) -> bytes:
    """One ``GetFlowsResponse`` as compact UTF-8 JSON, without the newline: the same JSON as
    encoding :func:`record_envelope`, with a flow's body encoded once and shared by every
    consumer that writes lines (file exporter, console, flow API, OTLP string bodies)."""
    if isinstance(record, Flow):
        form = wire_form(record)
        node = b',"node_name":' + _encode(record.node_name) if record.node_name else b""
        return b'{"flow":' + form.text_bytes() + node + b',"time":"' + form.json["time"].encode() + b'"}'
    return _encode(record_envelope(record))


def envelope_line(record: Record) -> str:
    """:func:`envelope_bytes` as text."""
    return envelope_bytes(record).decode()


def envelope(flow: Flow) -> dict[str, Any]:
    """Hubble's ``GetFlowsResponse`` JSON: what ``hubble observe -o json`` and its file
    exporter write, one per line."""
    body = flow_json(flow)
    out: dict[str, Any] = {"flow": body}
    if flow.node_name:
        out["node_name"] = flow.node_name
    out["time"] = body["time"]
    return out


def lost_json(lost: LostEvents) -> dict[str, Any]:
    """Hubble's ``LostEvent`` (``num_events_lost`` is a uint64, hence a string). The
    precise source is flowtel's metric label; the message carries Cilium's enum."""
    out: dict[str, Any] = {}
    source = cilium_lost_source(lost.source)
    if source != "UNKNOWN_LOST_EVENT_SOURCE":
        out["source"] = source
    if lost.count:
        out["num_events_lost"] = str(lost.count)
    return out


def lost_envelope(lost: LostEvents) -> dict[str, Any]:
    out: dict[str, Any] = {"lost_events": lost_json(lost)}
    if lost.node_name:
        out["node_name"] = lost.node_name
    out["time"] = format_time(lost.time_ns)
    return out


def record_envelope(record: Record) -> dict[str, Any]:
    """The ``GetFlowsResponse`` JSON for any record a logs pipeline carries."""
    if isinstance(record, Flow):
        return envelope(record)
    if isinstance(record, LostEvents):
        return lost_envelope(record)
    raise TypeError(f"not a flow-log record: {type(record).__name__}")


def to_response(record: Record) -> observer_pb2.GetFlowsResponse:
    """The ``GetFlowsResponse`` message for a record (a fresh message; its flow is a copy)."""
    resp = observer_pb2.GetFlowsResponse()
    if isinstance(record, Flow):
        resp.flow.CopyFrom(to_proto(record))
        resp.time.FromNanoseconds(record.time_ns)
    elif isinstance(record, LostEvents):
        json_format.ParseDict(lost_json(record), resp.lost_events)
        resp.time.FromNanoseconds(record.time_ns)
    else:
        raise TypeError(f"not a flow-log record: {type(record).__name__}")
    if record.node_name:
        resp.node_name = record.node_name
    return resp
