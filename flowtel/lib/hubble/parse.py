"""Cilium's wire form back into records: the inverse of :mod:`flowtel.lib.hubble.convert`.

``flowtel observe`` and ``policy suggest`` receive ``GetFlowsResponse`` messages (or their
JSON, from a flow-log file) and print or analyse them with the same code the agent uses,
which takes records. JSON is parsed strictly with the project's ``.proto`` files: a field
Cilium's schema does not have is an error, not ignored. A record parsed from the wire keeps
that wire form as its memo, so printing it again as JSON gives back exactly what was read
(its ``uuid`` included).
"""
from __future__ import annotations

import calendar
import re
from typing import Any, Mapping

from google.protobuf import json_format

from flowtel.configtypes import parse_duration
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.lib.hubble.convert import WireForm
from flowtel.records import (
    TCP_EVENT_BY_NAME,
    DnsInfo,
    Endpoint,
    EventKind,
    Flow,
    LostEvents,
    TcpFlagCounts,
    TrafficDirection,
    Verdict,
    Workload,
    frozen_extensions,
)
from flowtel.recordtables import MESSAGE_TYPE_DROP, PROTOCOL_BY_NAME, TCP_FLAG_NAMES

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})$"
)
_TCP_FLAG_BITS = {name: bit for bit, name in TCP_FLAG_NAMES}
# Extension keys the converter derives from record fields, not copied from ``extensions``.
_DERIVED_KEYS = frozenset({"packets", "bytes", "tcp_flags", "drop_reason", "tcp_event", "dns_unanswered", "drop_sample",
                           "ethertype"})


class FlowJSONError(ValueError):
    """A JSON object that is not a Hubble ``GetFlowsResponse`` flowtel can read."""


def parse_rfc3339(text: str) -> int:
    """Nanoseconds since the epoch from an RFC 3339 timestamp (any offset, up to 9 digits)."""
    m = _RFC3339.match(text.strip())
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r} (expected e.g. 2024-11-26T11:45:45Z)")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7) or "", m.group(8)
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * 1_000_000_000 + int(frac.ljust(9, "0") or 0)


def parse_time_arg(value: str, now_ns: int) -> int:
    """``--since``/``--until`` as Hubble takes them: RFC 3339, or a duration back from
    ``now_ns`` (``5m``, ``90s``). ValueError says what was expected."""
    try:
        return parse_rfc3339(value)
    except ValueError:
        pass
    try:
        return now_ns - int(parse_duration(value) * 1e9)
    except ValueError:
        raise ValueError(f"expected an RFC 3339 time or a duration such as 5m, got {value!r}") from None


def _endpoint(d: Mapping[str, Any]) -> Endpoint:
    return Endpoint(
        identity=int(d.get("identity", 0)),
        namespace=d.get("namespace", ""),
        pod_name=d.get("pod_name", ""),
        labels=tuple(d.get("labels", ())),
        workloads=tuple(Workload(w.get("name", ""), w.get("kind", "")) for w in d.get("workloads", ())),
        cluster_name=d.get("cluster_name", ""),
    )


def _dns(d: Mapping[str, Any]) -> DnsInfo:
    return DnsInfo(
        query=d.get("query", ""),
        qtypes=tuple(d.get("qtypes", ())),
        rcode=int(d.get("rcode", 0)),
        ips=tuple(d.get("ips", ())),
        ttl=int(d.get("ttl", 0)),
        cnames=tuple(d.get("cnames", ())),
        rrtypes=tuple(d.get("rrtypes", ())),
        observation_source=d.get("observation_source", ""),
    )


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) else 0


def _kind(d: Mapping[str, Any], ext: Mapping[str, Any]) -> EventKind:
    if d.get("Type") == "SOCK" or d.get("event_type", {}).get("type") == 7:
        return TCP_EVENT_BY_NAME.get(str(ext.get("tcp_event", "")), EventKind.TCP_RETRANSMIT)
    l7 = d.get("l7")
    if l7 is not None:
        l7_type = l7.get("type", "")
        if l7_type == "REQUEST":
            return EventKind.DNS_REQUEST
        if l7_type == "RESPONSE":
            return EventKind.DNS_RESPONSE
        return EventKind.DNS_UNANSWERED
    verdict = d.get("verdict", "")
    if verdict == "DROPPED" or verdict == "AUDIT" or d.get("event_type", {}).get("type") == MESSAGE_TYPE_DROP:
        return EventKind.DROP_SAMPLE if ext.get("drop_sample") is True else EventKind.DROP
    return EventKind.PACKET


def flow_from_json(d: Mapping[str, Any]) -> Flow:
    """A record from a ``flow.Flow`` JSON object already validated against the schema."""
    ip = d.get("IP")
    l4 = d.get("l4") or {}
    protocol = src_port = dst_port = tcp_flags = 0
    for name, body in l4.items():
        protocol = PROTOCOL_BY_NAME.get(name, 0)
        if name in ("ICMPv4", "ICMPv6"):
            src_port, dst_port = int(body.get("type", 0)), int(body.get("code", 0))
        else:
            src_port, dst_port = int(body.get("source_port", 0)), int(body.get("destination_port", 0))
            for flag, on in (body.get("flags") or {}).items():
                if on:
                    tcp_flags |= _TCP_FLAG_BITS.get(flag, 0)
    ext_any = d.get("extensions") or {}
    ext: Mapping[str, Any] = ext_any.get("value") or {} if isinstance(ext_any, Mapping) else {}
    kind = _kind(d, ext)
    counts = ext.get("tcp_flags")
    l7 = d.get("l7") or {}
    ethertype = 0x86DD if ip is not None and ip.get("ipVersion") == "IPv6" else 0x0800
    if ip is None and isinstance(ext.get("ethertype"), str):
        ethertype = int(str(ext["ethertype"]), 16)
    iface = d.get("interface") or {}
    drop_reason = str(ext.get("drop_reason") or "")
    if not drop_reason and d.get("verdict") in ("DROPPED", "AUDIT"):
        drop_reason = str(d.get("drop_reason_desc", ""))
    is_reply = d.get("is_reply")
    flow = Flow(
        time_ns=parse_rfc3339(d["time"]) if "time" in d else 0,
        node_name=d.get("node_name", ""),
        verdict=Verdict(d.get("verdict", "VERDICT_UNKNOWN")),
        ip_version=0 if ip is None else (6 if ip.get("ipVersion") == "IPv6" else 4),
        src_ip=ip.get("source", "") if ip is not None else "",
        dst_ip=ip.get("destination", "") if ip is not None else "",
        protocol=protocol,
        src_port=src_port,
        dst_port=dst_port,
        kind=kind,
        traffic_direction=TrafficDirection(d.get("traffic_direction", TrafficDirection.UNKNOWN.value)),
        is_reply=bool(is_reply) if is_reply is not None else None,
        ethertype=ethertype,
        ifindex=int(iface.get("index", 0)),
        ifname=iface.get("name", ""),
        # A drop sample is one packet of skb_len bytes (not counts: see EventKind.DROP_SAMPLE).
        packets=1 if kind is EventKind.DROP_SAMPLE else _int(ext.get("packets")),
        bytes=_int(ext.get("skb_len")) if kind is EventKind.DROP_SAMPLE else _int(ext.get("bytes")),
        tcp_flags=tcp_flags,
        tcp_flag_counts=TcpFlagCounts(_int(counts.get("SYN")), _int(counts.get("SYN-ACK")), _int(counts.get("FIN")),
                                      _int(counts.get("RST"))) if isinstance(counts, Mapping) else None,
        drop_reason=drop_reason,
        l7=_dns(l7["dns"]) if "dns" in l7 else None,
        latency_ns=int(l7.get("latency_ns", 0)),
        source=_endpoint(d["source"]) if "source" in d else None,
        destination=_endpoint(d["destination"]) if "destination" in d else None,
        source_names=tuple(d.get("source_names", ())),
        destination_names=tuple(d.get("destination_names", ())),
        extensions=frozen_extensions({k: v for k, v in ext.items() if k not in _DERIVED_KEYS}),
    )
    # The record prints exactly as it was read (uuid, emitter and all).
    flow.wire_memo.form = WireForm(dict(d))
    return flow


def validate_envelope(env: Mapping[str, Any]) -> observer_pb2.GetFlowsResponse:
    """``env`` parsed strictly as Cilium's ``GetFlowsResponse``; FlowJSONError says what is wrong."""
    msg = observer_pb2.GetFlowsResponse()
    try:
        json_format.ParseDict(env, msg)
    except json_format.ParseError as exc:
        raise FlowJSONError(f"not a Hubble GetFlowsResponse: {exc}") from None
    return msg


def record_from_envelope(env: Mapping[str, Any]) -> Flow | LostEvents | None:
    """The record in one ``{"flow": …}`` or ``{"lost_events": …}`` envelope, checked against
    the schema; None for other response types (node status and the like), which a reader skips."""
    if not isinstance(env, Mapping):
        raise FlowJSONError(f"not a Hubble GetFlowsResponse: a JSON {type(env).__name__}, not an object")
    validate_envelope(env)
    if "flow" in env:
        try:
            return flow_from_json(env["flow"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FlowJSONError(f"not a Hubble flow flowtel can read: {exc}") from None
    lost = env.get("lost_events")
    if lost is not None:
        return LostEvents(
            time_ns=parse_rfc3339(env["time"]) if "time" in env else 0,
            source=lost.get("source", ""),
            count=int(lost.get("num_events_lost", 0)),
            node_name=env.get("node_name", ""),
        )
    return None
