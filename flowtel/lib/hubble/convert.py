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

The JSON *text* (what the file exporter, the console, OTLP string bodies and the DNS
proxy's flow log write) is not encoded from that dict: it is the same bytes assembled from
per-shape templates (:func:`_flow_text`), because most records are only ever written as
text and the dict alone cost more than the whole text now does; tests compare the two
byte for byte over every kind of record and its variants.

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
    TcpFlagCounts,
    TrafficDirection,
    Verdict,
    flow_fields,
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


# The uuid as the text templates write it: the per-process head, then the serial (%012x).
_UUID_TEXT = b'","uuid":"' + _UUID_HEAD.encode() + b"%012x"


class WireForm:
    """A record's Hubble forms, each built once, on demand, by the functions below (which
    have the record at hand): its compact JSON text (bytes, and str for the consumers that
    want one), its JSON mapping and the message.

    The text of a record comes from :func:`_flow_text` (the parts fixed by the record's
    shape encoded once, per-record values spliced in), not from encoding the mapping: most
    records are only ever written as text (file exporter, console, OTLP string bodies), so
    the mapping is built only when something asks for it (the message, a field mask, OTLP
    map bodies). Both carry this form's ``uuid`` and ``time``.

    The form holds no reference to its record (the record holds the form: a cycle would
    leave every record to the cyclic collector).
    """

    __slots__ = ("serial", "time", "json", "given", "text_bytes", "text", "proto", "line", "_uuid")

    def __init__(self, json: dict[str, Any] | None = None, *, time_ns: int = 0) -> None:
        """``json``: a mapping already made (a parsed record: it prints exactly as it was
        read); otherwise a new flow id and the record's time (``time_ns``)."""
        self.json = json
        self.given = json is not None
        self.text_bytes: bytes | None = None
        self.text: str | None = None
        self.proto: flow_pb2.Flow | None = None
        self.line: bytes | None = None  # the envelope line, when that was asked for first
        if json is not None:
            self.serial = 0
            self._uuid: str | None = json.get("uuid", "")
            self.time: str = json.get("time", "")
        else:
            self.serial = next(_uuid_counter) & 0xFFFFFFFFFFFF
            self._uuid = None
            self.time = format_time(time_ns)

    @property
    def uuid(self) -> str:
        uuid = self._uuid
        if uuid is None:
            uuid = self._uuid = f"{_UUID_HEAD}{self.serial:012x}"
        return uuid


_new_object = object.__new__


def _fresh_form(serial: int, time: str) -> WireForm:
    """``WireForm(time_ns=...)`` with its serial drawn and its time formatted by the caller
    (a batch formats each second once): the same form, without the keyword call."""
    form: WireForm = _new_object(WireForm)
    form.json = form.text_bytes = form.text = form.proto = form.line = form._uuid = None
    form.given = False
    form.serial = serial
    form.time = time
    return form


def wire_form(flow: Flow) -> WireForm:
    """The record's shared :class:`WireForm` (made on first use, by whichever thread asks)."""
    memo = flow.wire_memo
    form: WireForm | None = memo.form
    if form is not None:
        return form
    built = WireForm(time_ns=flow.time_ns)
    with _memo_lock:
        form = memo.form
        if form is None:  # two threads may make it; one wins, so every consumer sees one uuid
            memo.form = form = built
    return form


def flow_json(flow: Flow) -> dict[str, Any]:
    """The ``flow.Flow`` message's proto3 JSON mapping (proto field names): what
    ``hubble observe -o json`` prints under ``"flow"``. Shared: do not change it."""
    form = wire_form(flow)
    data = form.json
    if data is None:
        data = form.json = _flow_dict(flow, form.uuid, form.time)
    return data


def flow_text_bytes(flow: Flow) -> bytes:
    """The JSON mapping as compact UTF-8 JSON (what every line-oriented consumer writes),
    built once per record and shared."""
    form = wire_form(flow)
    data = form.text_bytes
    if data is None:
        line = form.line
        if line is not None:  # the file exporter made the envelope line first: the body is inside it
            tail = len(_node_part(flow.node_name)) + len(_TIME_KEY) + len(form.time.encode()) + len(_LINE_END)
            data = form.text_bytes = line[len(_FLOW_KEY):len(line) - tail]
            return data
        if form.given:
            data = _kept(_encode(flow_json(flow)))
        else:
            try:
                data = _flow_text(flow, form.serial, form.time)
            except orjson.JSONEncodeError:  # e.g. a lone surrogate in a name: what the stdlib writes
                data = _stdlib(flow_json(flow)).encode()
        form.text_bytes = data
    return data


def flow_text(flow: Flow) -> str:
    """:func:`flow_text_bytes` as text (built once per record)."""
    form = wire_form(flow)
    text = form.text
    if text is None:
        text = form.text = flow_text_bytes(flow).decode()
    return text


def to_proto(flow: Flow) -> flow_pb2.Flow:
    """The record as a ``flow.Flow`` message (shared: copy it before changing it)."""
    form = wire_form(flow)
    proto = form.proto
    if proto is None:
        proto = form.proto = flow_message(flow_json(flow))
    return proto


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

    __slots__ = ("json", "_text")

    def __init__(self, json: dict[str, Any]) -> None:
        self.json = json
        self._text: bytes | None = None

    def text(self) -> bytes:
        """The mapping as orjson encodes it (raises orjson.JSONEncodeError where it cannot)."""
        data = self._text
        if data is None:
            data = self._text = _kept(_dumps(self.json))
        return data


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


def _flow_dict(flow: Flow, uuid: str, time: str) -> dict[str, Any]:
    kind = flow.kind
    is_dns = kind.is_dns
    is_tcp_event = kind.is_tcp_event
    verdict = flow.verdict
    out: dict[str, Any] = {"time": time, "uuid": uuid, "emitter": EMITTER}
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
    out.update(_tail_members(kind, verdict, flow.drop_reason, cilium_reason, flow.traffic_direction, is_reply))
    if flow.ifindex or flow.ifname:
        out["interface"] = _interface_json(flow.ifindex, flow.ifname)
    out["Summary"] = summary(flow)
    ext = _extensions(flow, kind)
    if ext:
        out["extensions"] = {"@type": STRUCT_TYPE_URL, "value": ext}
    return out


# -- the JSON text, from per-shape parts ------------------------------------------------
#
# The same bytes as encoding _flow_dict's mapping (tests compare the two for every kind of
# record), without building it: a flow's text is a few per-record values (time, uuid,
# addresses, ports, counts, names) between parts that depend only on what kind of flow it
# is and where it was seen (verdict, event type, direction, interface, node, endpoints),
# and those parts are encoded once per distinct value and kept (bounded: cleared when
# full, as pods and interfaces churn). Strings that vary per record go through orjson,
# so their escaping is the encoder's own.

_PART_CACHE_MAX = 65536
_EMITTER_TEXT = orjson.dumps(EMITTER)
_verdict_parts: dict[tuple[Verdict, str], tuple[bytes, str]] = {}
_type_parts: dict[tuple[str, str], bytes] = {}
_tail_parts: dict[tuple[Any, ...], bytes] = {}
_interface_texts: dict[tuple[int, str], bytes] = {}
_templates: dict[tuple[Any, ...], bytes] = {}
_line_templates: dict[tuple[Any, ...], bytes] = {}
_TEMPLATE_CACHE_MAX = 4096  # shapes, not flows: kinds × verdicts × flags × directions × nodes
_strings: dict[str, bytes] = {}
_FLAG_TEXTS = tuple(orjson.dumps(d) for d in _FLAG_DICTS)
_L4_NAMES = {IPPROTO_TCP: b'{"TCP":{', IPPROTO_UDP: b'{"UDP":{', IPPROTO_SCTP: b'{"SCTP":{'}


def _string(value: str) -> bytes:
    """A short string that recurs (a summary, a drop reason) as JSON, encoded once."""
    data = _strings.get(value)
    if data is None:
        data = _kept(_dumps(value))
        if len(_strings) >= _PART_CACHE_MAX:
            _strings.clear()
        _strings[value] = data
    return data


def _verdict_part(verdict: Verdict, drop_reason: str) -> tuple[bytes, str]:
    key = (verdict, drop_reason)
    hit = _verdict_parts.get(key)
    if hit is None:
        part = b""
        cilium_reason = ""
        if verdict is not Verdict.VERDICT_UNKNOWN:
            part = b',"verdict":' + _dumps(verdict._value_)
        if verdict is Verdict.DROPPED and drop_reason:
            cilium_reason = cilium_drop_reason(drop_reason)
            if cilium_reason != "DROP_REASON_UNKNOWN":
                part += b',"drop_reason":%d' % CILIUM_DROP_REASONS[cilium_reason]
        hit = (part, cilium_reason)
        if len(_verdict_parts) >= _PART_CACHE_MAX:
            _verdict_parts.clear()
        _verdict_parts[key] = hit
    return hit


def _l4_text(flow: Flow, is_dns: bool) -> bytes:
    proto = flow.protocol
    head = _L4_NAMES.get(proto)
    if head is not None:
        sport, dport = flow.src_port, flow.dst_port
        if sport:
            ports = b'"source_port":%d,"destination_port":%d' % (sport, dport) if dport else \
                b'"source_port":%d' % sport
        else:
            ports = b'"destination_port":%d' % dport if dport else b""
        if proto == IPPROTO_TCP and not is_dns:
            flags = _FLAG_TEXTS[flow.tcp_flags & 0xFF]
            return b',"l4":' + head + ports + (b',"flags":' if ports else b'"flags":') + flags + b"}}"
        return b',"l4":' + head + ports + b"}}"
    if proto == IPPROTO_ICMP or proto == IPPROTO_ICMPV6:
        icmp = []
        if flow.src_port:
            icmp.append(b'"type":%d' % flow.src_port)
        if flow.dst_port:
            icmp.append(b'"code":%d' % flow.dst_port)
        name = b'{"ICMPv4":{' if proto == IPPROTO_ICMP else b'{"ICMPv6":{'
        return b',"l4":' + name + b",".join(icmp) + b"}}"
    return b""


def _tail_members(kind: EventKind, verdict: Verdict, drop_reason: str, cilium_reason: str,
                  direction: TrafficDirection, is_reply: bool | None) -> dict[str, Any]:
    """The flow's members from ``reply`` to ``is_reply``, in Hubble's order: one definition
    for the mapping (:func:`_flow_dict`) and the text's cached part (:func:`_tail_part`)."""
    out: dict[str, Any] = {}
    if is_reply:
        out["reply"] = True  # deprecated twin of is_reply that Hubble still fills
    observation_point = None
    if kind.is_dns:
        out["event_type"] = _EVENT_ACCESS_LOG
    elif kind.is_tcp_event:
        out["event_type"] = _EVENT_TRACE_SOCK
    elif verdict is Verdict.DROPPED:
        out["event_type"] = _drop_event_type(drop_reason)
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
    return out


def _tail_part(kind: EventKind, verdict: Verdict, drop_reason: str, cilium_reason: str,
               direction: TrafficDirection, is_reply: bool | None) -> bytes:
    """From ``reply`` to ``is_reply``: what follows from the record's kind, verdict,
    direction and reply bit (a handful of values)."""
    key = (kind, verdict, drop_reason, direction, is_reply)
    part = _tail_parts.get(key)
    if part is None:
        out = _tail_members(kind, verdict, drop_reason, cilium_reason, direction, is_reply)
        part = b"," + _dumps(out)[1:-1]  # the members, spliced into the flow's object
        if len(_tail_parts) >= _PART_CACHE_MAX:
            _tail_parts.clear()
        _tail_parts[key] = part
    return part


def _interface_text(ifindex: int, ifname: str) -> bytes:
    key = (ifindex, ifname)
    part = _interface_texts.get(key)
    if part is None:
        part = b',"interface":' + _dumps(_interface_json(ifindex, ifname)) if ifindex or ifname else b""
        if len(_interface_texts) >= _PART_CACHE_MAX:
            _interface_texts.clear()
        _interface_texts[key] = part
    return part


def _type_part(type_name: str, node_name: str) -> bytes:
    key = (type_name, node_name)
    part = _type_parts.get(key)
    if part is None:
        part = b',"Type":"' + type_name.encode() + b'"'
        if node_name:
            part += b',"node_name":' + _dumps(node_name)
        if len(_type_parts) >= _PART_CACHE_MAX:
            _type_parts.clear()
        _type_parts[key] = part
    return part


# A TCP flow's flag counts as text, by the counts object: records share one object per
# distinct counts (records.tcp_flag_counts), so the text is one %s of the template rather
# than four %d (each conversion of a bytes format costs ~40 ns, the text's bytes almost
# nothing). Keyed by id, each entry holding its object so that the id stays its own while
# cached; bounded, cleared when full.
_counts_texts: dict[int, tuple[TcpFlagCounts, bytes]] = {}
_COUNTS_CACHE_MAX = 8192


def _counts_text(counts: TcpFlagCounts) -> bytes:
    hit = _counts_texts.get(id(counts))
    if hit is not None and hit[0] is counts:
        return hit[1]
    text = b'{"SYN":%d,"SYN-ACK":%d,"FIN":%d,"RST":%d}' % (counts.syn, counts.syn_ack, counts.fin, counts.rst)
    if len(_counts_texts) >= _COUNTS_CACHE_MAX:
        _counts_texts.clear()
    _counts_texts[id(counts)] = (counts, text)
    return text


def _extensions_text(flow: Flow, kind: EventKind) -> bytes:
    if flow.extensions:
        ext = _extensions(flow, kind)  # the record's own keys first: the general path
        return b',"extensions":{"@type":"' + STRUCT_TYPE_URL.encode() + b'","value":' + _dumps(ext) + b"}"
    parts = []
    if (kind is EventKind.PACKET or kind is EventKind.DROP) and (flow.packets or flow.bytes):
        parts.append(b'"packets":%d,"bytes":%d' % (flow.packets, flow.bytes))
    counts = flow.tcp_flag_counts
    if counts is not None:
        parts.append(b'"tcp_flags":' + _counts_text(counts))
    if flow.drop_reason:
        parts.append(b'"drop_reason":' + _string(flow.drop_reason))
    if kind.is_tcp_event:
        parts.append(b'"tcp_event":' + _string(kind.value))
    elif kind is EventKind.DNS_UNANSWERED:
        parts.append(b'"dns_unanswered":true')
    elif kind is EventKind.DROP_SAMPLE:
        parts.append(b'"drop_sample":true')
    if flow.ip_version == 0:
        parts.append(b'"ethertype":"0x%04x"' % flow.ethertype)
    if not parts:
        return b""
    return _EXT_HEAD + b",".join(parts) + b"}}"


_EXT_HEAD = b',"extensions":{"@type":"' + STRUCT_TYPE_URL.encode() + b'","value":{'


def _template(flow: Flow, kind: EventKind, key: tuple[Any, ...]) -> bytes:
    """The text of every flow of ``flow``'s shape (see :func:`_flow_text`) as a bytes
    %-format: the parts fixed by the shape encoded, a ``%s``/``%d`` where each per-record
    value goes, in the order :func:`_flow_text` passes them."""
    _, verdict, drop_reason, ip_version, protocol, tcp_flags, has_sport, has_dport, has_counts, has_flags, \
        has_src, has_dst, direction, is_reply, node_name = key

    def fixed(part: bytes) -> bytes:
        return part.replace(b"%", b"%%")

    verdict_part, cilium_reason = _verdict_part(verdict, drop_reason)
    ports = []
    if has_sport:
        ports.append(b'"source_port":%d')
    if has_dport:
        ports.append(b'"destination_port":%d')
    l4 = _L4_NAMES[protocol] + b",".join(ports)
    if protocol == IPPROTO_TCP:
        l4 += (b',"flags":' if ports else b'"flags":') + _FLAG_TEXTS[tcp_flags & 0xFF]
    ext = []
    if has_counts:
        ext.append(b'"packets":%d,"bytes":%d')
    if has_flags:
        ext.append(b'"tcp_flags":%s')  # _counts_text
    if drop_reason:
        ext.append(fixed(b'"drop_reason":' + _string(drop_reason)))
    if kind.is_tcp_event:
        ext.append(fixed(b'"tcp_event":' + _string(kind.value)))
    elif kind is EventKind.DROP_SAMPLE:
        ext.append(b'"drop_sample":true')
    return b"".join((
        b'{"time":"%s', _UUID_TEXT, b'","emitter":', fixed(_EMITTER_TEXT), fixed(verdict_part),
        b',"IP":{"source":%s,"destination":%s,"ipVersion":"', b"IPv6" if ip_version == 6 else b"IPv4", b'"}',
        b',"l4":', l4, b"}}",
        b',"source":%s' if has_src else b"", b',"destination":%s' if has_dst else b"",
        fixed(_type_part("SOCK" if kind.is_tcp_event else "L3_L4", node_name)),
        fixed(_tail_part(kind, verdict, drop_reason, cilium_reason, direction, is_reply)),
        b"%s",  # the interface
        b',"Summary":', fixed(_string(summary(flow))),
        (_EXT_HEAD.replace(b"%", b"%%") + b",".join(ext) + b"}}") if ext else b"",
        b"}",
    ))


_TEMPLATE_PROTOCOLS = frozenset(_L4_NAMES)
# What _flow_text reads of every record, in one C call (a named tuple's attribute is a
# descriptor call each; a flow's text reads 23 of them).
_text_fields = flow_fields(
    "kind", "verdict", "drop_reason", "ip_version", "protocol", "tcp_flags", "src_port", "dst_port", "packets",
    "bytes", "tcp_flag_counts", "source", "destination", "traffic_direction", "is_reply", "node_name",
    "extensions", "source_names", "destination_names", "src_ip", "dst_ip", "ifindex", "ifname")
_ip_texts: dict[str, bytes] = {}


def _ip_text(ip: str) -> bytes:
    if len(_ip_texts) >= _PART_CACHE_MAX:
        _ip_texts.clear()
    text = _ip_texts[ip] = _kept(_dumps(ip))  # kept: a cached orjson result would hold its 4 KB buffer
    return text


def _shape_template(flow: Flow, kind: EventKind, key: tuple[Any, ...], line: bool) -> bytes:
    """The template of ``key``'s shape (:func:`_template`; with ``line``, inside its envelope
    line), made and kept."""
    template = _template(flow, kind, key)
    if line:
        template = _FLOW_KEY + template + _node_part(key[-1]).replace(b"%", b"%%") + _TIME_KEY + b"%s" + _LINE_END
    cache = _line_templates if line else _templates
    if len(cache) >= _TEMPLATE_CACHE_MAX:
        cache.clear()
    cache[key] = template
    return template


def _flow_text(flow: Flow, serial: int, time: str, line: bool = False) -> bytes:
    """:func:`_flow_dict`'s mapping as orjson encodes it, built from parts (see above); with
    ``line``, inside its envelope line (what :func:`envelope_line_bytes` gives).

    Most records (L3/L4 flows, drops, TCP events over TCP/UDP/SCTP, without names or
    extensions of their own) are one shape's template filled with their values: the key
    of what the text depends on, one dict hit, one format (the envelope's template holds the
    body's, so a file's line is one format too). The rest are assembled part by part."""
    (kind, verdict, drop_reason, ip_version, protocol, tcp_flags, sport, dport, packets, nbytes, counts, src, dst,
     direction, is_reply, node_name, extensions, source_names, destination_names, src_ip, dst_ip, ifindex,
     ifname) = _text_fields(flow)
    if (protocol in _TEMPLATE_PROTOCOLS and not kind.is_dns and not extensions and not source_names
            and not destination_names and ip_version):
        has_counts = (kind is EventKind.PACKET or kind is EventKind.DROP) and (packets != 0 or nbytes != 0)
        key = (kind, verdict, drop_reason, ip_version, protocol, tcp_flags, sport != 0, dport != 0, has_counts,
               counts is not None, src is not None, dst is not None, direction, is_reply, node_name)
        template = (_line_templates if line else _templates).get(key)
        if template is None:
            template = _shape_template(flow, kind, key, line)
        time_text = time.encode()
        # Addresses, endpoints and interfaces recur across flows: their texts come from
        # caches (an orjson call each would cost more than the dict hit).
        texts = _ip_texts
        sip = texts.get(src_ip)
        if sip is None:
            sip = _ip_text(src_ip)
        dip = texts.get(dst_ip)
        if dip is None:
            dip = _ip_text(dst_ip)
        iface = _interface_texts.get((ifindex, ifname))
        if iface is None:
            iface = _interface_text(ifindex, ifname)
        if src is not None and dst is not None and sport and dport and has_counts:
            # The common shapes (a TCP flow with its flag counts, a UDP one without, between
            # named ends) as one tuple, not a list grown value by value.
            memo = src.json_memo
            stext = memo._text if memo is not None and memo._text is not None else _endpoint_form(src).text()
            memo = dst.json_memo
            dtext = memo._text if memo is not None and memo._text is not None else _endpoint_form(dst).text()
            if counts is not None:
                ctext = _counts_text(counts)
                if line:
                    return template % (time_text, serial, sip, dip, sport, dport, stext, dtext, iface, packets,
                                       nbytes, ctext, time_text)
                return template % (time_text, serial, sip, dip, sport, dport, stext, dtext, iface, packets, nbytes,
                                   ctext)
            if line:
                return template % (time_text, serial, sip, dip, sport, dport, stext, dtext, iface, packets, nbytes,
                                   time_text)
            return template % (time_text, serial, sip, dip, sport, dport, stext, dtext, iface, packets, nbytes)
        args: list[Any] = [time_text, serial, sip, dip]
        if sport:
            args.append(sport)
        if dport:
            args.append(dport)
        if src is not None:
            memo = src.json_memo
            args.append(memo._text if memo is not None and memo._text is not None else _endpoint_form(src).text())
        if dst is not None:
            memo = dst.json_memo
            args.append(memo._text if memo is not None and memo._text is not None else _endpoint_form(dst).text())
        args.append(iface)
        if has_counts:
            args.append(packets)
            args.append(nbytes)
        if counts is not None:
            args.append(_counts_text(counts))
        if line:
            args.append(time_text)
        return template % tuple(args)
    if line:
        return _ENVELOPE_LINE % (_flow_text(flow, serial, time), _node_part(flow.node_name), time.encode())
    is_dns = kind.is_dns
    verdict = flow.verdict
    verdict_part, cilium_reason = _verdict_part(verdict, flow.drop_reason)
    parts = [b'{"time":"', time.encode(), _UUID_TEXT % serial, b'","emitter":', _EMITTER_TEXT, verdict_part]
    append = parts.append
    if flow.ip_version == 0:
        append(b',"ethernet":{}')
    else:
        append(b',"IP":{"source":')
        append(_dumps(flow.src_ip))
        append(b',"destination":')
        append(_dumps(flow.dst_ip))
        append(b',"ipVersion":"IPv6"}' if flow.ip_version == 6 else b',"ipVersion":"IPv4"}')
        append(_l4_text(flow, is_dns))
    if flow.source is not None:
        append(b',"source":')
        append(_endpoint_form(flow.source).text())
    if flow.destination is not None:
        append(b',"destination":')
        append(_endpoint_form(flow.destination).text())
    append(_type_part("L7" if is_dns else "SOCK" if kind.is_tcp_event else "L3_L4", flow.node_name))
    if flow.source_names:
        append(b',"source_names":')
        append(_dumps(flow.source_names))
    if flow.destination_names:
        append(b',"destination_names":')
        append(_dumps(flow.destination_names))
    if is_dns:
        l7: dict[str, Any] = {}
        l7_type = flow.l7_type
        if l7_type:
            l7["type"] = l7_type
        if flow.latency_ns:
            l7["latency_ns"] = str(flow.latency_ns)
        if flow.l7 is not None:
            l7["dns"] = _dns_json(flow.l7)
        append(b',"l7":')
        append(_dumps(l7))
    is_reply = flow.is_reply if kind is not EventKind.DNS_UNANSWERED else None
    append(_tail_part(kind, verdict, flow.drop_reason, cilium_reason, flow.traffic_direction, is_reply))
    append(_interface_text(flow.ifindex, flow.ifname))
    append(b',"Summary":')
    append(_dumps(summary(flow)) if is_dns else _string(summary(flow)))
    append(_extensions_text(flow, kind))
    append(b"}")
    return b"".join(parts)


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


def envelope_bytes(record: Record) -> bytes:
    """One ``GetFlowsResponse`` as compact UTF-8 JSON, without the newline: the same JSON as
    encoding :func:`record_envelope`, with a flow's body encoded once and shared by every
    consumer that writes lines (file exporter, console, flow API, OTLP string bodies)."""
    if isinstance(record, Flow):
        return _ENVELOPE % (flow_text_bytes(record), _node_part(record.node_name), wire_form(record).time.encode())
    return _encode(record_envelope(record))


def envelope_lines(records: list[Record]) -> list[bytes]:
    """:func:`envelope_line_bytes` of every record of a batch (the same bytes, the same
    shared forms), with the per-record work a batch can share done once: one lock for the
    forms the batch makes, and each time text from its second's prefix, formatted once per
    distinct second."""
    fresh = _fresh_form
    prefix_sec, prefix = -1, ""
    # Per record, the form made here (None: it had one, or is not a flow): the second loop
    # fills those without asking the record again.
    made: list[WireForm | None] = []
    note = made.append
    with _memo_lock:  # one acquisition: every form made here is the one each consumer sees
        for r in records:
            form = None
            if r.__class__ is Flow:
                memo = r[-1]  # wire_memo: the last field
                if memo.form is None:
                    sec, nanos = divmod(r[0], 1_000_000_000)  # time_ns: the first field
                    if sec != prefix_sec:
                        prefix_sec, prefix = sec, format_time(sec * 1_000_000_000)[:-1]
                    if nanos % 1_000:  # a kernel timestamp's usual case first: all nine digits
                        text = "%s.%09dZ" % (prefix, nanos)
                    elif nanos == 0:
                        text = prefix + "Z"
                    elif nanos % 1_000_000 == 0:
                        text = "%s.%03dZ" % (prefix, nanos // 1_000_000)
                    else:
                        text = "%s.%06dZ" % (prefix, nanos // 1_000)
                    memo.form = form = fresh(next(_uuid_counter) & 0xFFFFFFFFFFFF, text)
            note(form)
    out: list[bytes] = []
    append = out.append
    fill = _flow_text
    for r, form in zip(records, made):
        if form is not None:  # made above, so not a parsed record's (a line another consumer made meanwhile is these bytes)
            try:
                line = form.line = fill(r, form.serial, form.time, True)  # type: ignore[arg-type]  # forms are made for flows only (the loop above)
            except orjson.JSONEncodeError:
                line = _form_line(r, form)  # type: ignore[arg-type]  # as above
            append(line)
        elif r.__class__ is Flow:
            form = r[-1].form
            line = form.line
            append(line if line is not None else _form_line(r, form))
        else:
            append(envelope_line_bytes(r))
    return out


def envelope_line_bytes(record: Record) -> bytes:
    """:func:`envelope_bytes` and its newline, in one piece (what a line-oriented file gets).
    A flow's line is built once and kept; its body text, if asked for later, is cut from it."""
    if not isinstance(record, Flow):
        return _encode(record_envelope(record)) + b"\n"
    form = wire_form(record)
    line = form.line
    return line if line is not None else _form_line(record, form)


def _form_line(record: Flow, form: WireForm) -> bytes:
    """Builds (and keeps) the record's envelope line."""
    line = None
    if form.text_bytes is None and not form.given:
        try:
            line = _flow_text(record, form.serial, form.time, line=True)
        except orjson.JSONEncodeError:
            line = None  # the body's own fallback below
    if line is None:
        line = _ENVELOPE_LINE % (flow_text_bytes(record), _node_part(record.node_name), form.time.encode())
    form.line = line
    return line


_FLOW_KEY = b'{"flow":'
_TIME_KEY = b',"time":"'
_LINE_END = b'"}\n'
_ENVELOPE = _FLOW_KEY + b"%s%s" + _TIME_KEY + b'%s"}'
_ENVELOPE_LINE = _ENVELOPE + b"\n"
_node_parts: dict[str, bytes] = {}


def _node_part(node_name: str) -> bytes:
    part = _node_parts.get(node_name)
    if part is None:
        part = b',"node_name":' + _encode(node_name) if node_name else b""
        if len(_node_parts) >= 1024:  # one node's name, in practice
            _node_parts.clear()
        _node_parts[node_name] = part
    return part


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
