"""Hubble's flow JSON back into records: the inverse of :mod:`flowtel.hubble`.

``flowtel observe`` receives Hubble envelopes from the flows API (or reads them from a
flow-log file) and prints them with the same formatters the exporters use, which take
records. The round trip is exact for everything :func:`flowtel.hubble.flow_to_dict`
emits: ``flow_to_dict(flow_from_dict(d)) == d``. OTel attributes beside the Hubble body
(``Endpoint.attributes``) are not part of that JSON and come back empty.
"""
from __future__ import annotations

import calendar
import re
from typing import Any, Mapping

from flowtel.configtypes import parse_duration
from flowtel.records import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    DnsInfo,
    Endpoint,
    Flow,
    FlowType,
    LostEvents,
    TrafficDirection,
    Verdict,
    Workload,
)

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})$"
)
_L4_PROTOCOLS = {"TCP": IPPROTO_TCP, "UDP": IPPROTO_UDP, "SCTP": IPPROTO_SCTP,
                 "ICMPv4": IPPROTO_ICMP, "ICMPv6": IPPROTO_ICMPV6}
_TCP_FLAG_BITS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20,
                  "ECE": 0x40, "CWR": 0x80}


class FlowJSONError(ValueError):
    """A JSON object that is not a Hubble flow or envelope flowtel can read."""


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
        labels=list(d.get("labels", ())),
        workloads=[Workload(w.get("name", ""), w.get("kind", "")) for w in d.get("workloads", ())],
        cluster_name=d.get("cluster_name", ""),
    )


def _dns(d: Mapping[str, Any]) -> DnsInfo:
    return DnsInfo(
        query=d.get("query", ""),
        qtypes=list(d.get("qtypes", ())),
        rcode=int(d.get("rcode", 0)),
        ips=list(d.get("ips", ())),
        ttl=int(d.get("ttl", 0)),
        cnames=list(d.get("cnames", ())),
        rrtypes=list(d.get("rrtypes", ())),
        observation_source=d.get("observation_source", ""),
    )


def flow_from_dict(d: Mapping[str, Any]) -> Flow:
    """A :class:`Flow` from the object ``hubble observe -o json`` prints under ``"flow"``."""
    try:
        return _flow_from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise FlowJSONError(f"not a Hubble flow object: {exc}") from None


def _flow_from_dict(d: Mapping[str, Any]) -> Flow:
    flow_type = FlowType(d.get("Type", "L3_L4"))
    ip = d.get("IP")
    flow = Flow(
        time_ns=parse_rfc3339(d["time"]),
        node_name=d.get("node_name", ""),
        verdict=Verdict(d["verdict"]),
        ip_version=0 if ip is None else (6 if ip.get("ipVersion") == "IPv6" else 4),
        src_ip=ip.get("source", "") if ip else "",
        dst_ip=ip.get("destination", "") if ip else "",
        protocol=0,
        flow_type=flow_type,
        traffic_direction=TrafficDirection(d.get("traffic_direction", TrafficDirection.UNKNOWN)),
        is_reply=d.get("is_reply"),
        drop_reason=d.get("drop_reason_desc", ""),
        source=_endpoint(d["source"]) if "source" in d else None,
        destination=_endpoint(d["destination"]) if "destination" in d else None,
        source_names=list(d.get("source_names", ())),
        destination_names=list(d.get("destination_names", ())),
    )
    if ip is not None:
        flow.ethertype = 0x86DD if flow.ip_version == 6 else 0x0800
    for name, body in (d.get("l4") or {}).items():
        flow.protocol = _L4_PROTOCOLS[name]
        if name.startswith("ICMP"):
            flow.src_port, flow.dst_port = int(body.get("type", 0)), int(body.get("code", 0))
        else:
            flow.src_port, flow.dst_port = int(body.get("source_port", 0)), int(body.get("destination_port", 0))
        for flag, on in (body.get("flags") or {}).items():
            if on:
                flow.tcp_flags |= _TCP_FLAG_BITS[flag]
    l7 = d.get("l7")
    if l7 is not None:
        flow.l7_type = l7.get("type", "")
        flow.latency_ns = int(l7.get("latency_ns", 0))
        if "dns" in l7:
            flow.l7 = _dns(l7["dns"])
    iface = d.get("interface")
    if iface is not None:
        flow.ifindex, flow.ifname = int(iface.get("index", 0)), iface.get("name", "")
    extensions = dict(d.get("extensions") or {})
    if flow_type != FlowType.L7 and "packets" in extensions:
        flow.packets = int(extensions.pop("packets"))
        flow.bytes = int(extensions.pop("bytes", 0))
    if "tcp_flags" in extensions:
        flow.tcp_flag_counts = dict(extensions.pop("tcp_flags"))
    if ip is None and "ethertype" in extensions:
        flow.ethertype = int(extensions.pop("ethertype"), 16)
    flow.extensions = extensions
    return flow


def record_from_envelope(env: Mapping[str, Any]) -> Flow | LostEvents | None:
    """The record in one ``{"flow": …}`` or ``{"lost_events": …}`` envelope; None for other
    response types (node status and the like), which a reader skips."""
    if "flow" in env:
        return flow_from_dict(env["flow"])
    lost = env.get("lost_events")
    if lost is not None:
        try:
            return LostEvents(
                time_ns=parse_rfc3339(env["time"]) if "time" in env else 0,
                source=lost.get("source", ""),
                count=int(lost.get("num_events_lost", 0)),
                node_name=env.get("node_name", ""),
            )
        except (TypeError, ValueError) as exc:
            raise FlowJSONError(f"not a Hubble lost_events object: {exc}") from None
    return None
