"""Hubble's flow output formats: the protojson ``Flow`` object, its envelope, the compact line.

Shared by the exporters and ``flowtel observe``, so a record prints the same everywhere.
The JSON is what ``hubble observe -o json`` prints (Cilium's ``flow.proto`` through
protojson with proto field names): zero values and empty lists are omitted, enums are
their names, ``uint64`` values are strings, timestamps are RFC 3339 in UTC with 0, 3, 6
or 9 fractional digits.

Where flowtel's records say more or less than Cilium's datapath, the choices are:

- ``drop_reason_desc`` carries the kernel's reason name (``NETFILTER_DROP``, …), not one
  of Cilium's own enum values; the numeric ``drop_reason`` is not emitted.
- flowtel counts flows at the pod's host-side interface, so the observation point follows
  from ``traffic_direction``: EGRESS is ``FROM_ENDPOINT`` (event sub-type 5), INGRESS is
  ``TO_ENDPOINT`` (sub-type 0). Drops are event type 1, L7 flows 129, the rest 4.
- Aggregated counts go in ``extensions`` as Retina does: ``packets``, ``bytes``, and
  ``tcp_flags`` (per-flag packet counts, e.g. ``{"SYN": 1, "SYN-ACK": 0, …}``) when the
  receiver counted them. Frames that are not IP get ``ethernet: {}`` (no MAC addresses are
  recorded) and ``extensions.ethertype``.
- ``Summary`` follows Hubble's parsers: ``TCP Flags: SYN, ACK`` (Hubble's flag order; a
  TCP flow with no flags seen is just ``TCP``), ``UDP``, ``SCTP``, ``ICMPv4 EchoRequest``,
  ``ICMPv6 DestinationUnreachable(PortUnreachable)`` (gopacket's type/code names),
  ``IPv4``/``IPv6`` for other protocols, ``ARP`` (or ``Ethernet 0x88b5``) for non-IP frames,
  ``DNS Query example.com. A``, ``DNS Answer "1.2.3.4" TTL: 300 (Query example.com. A)``
  (``Proxy`` instead of ``Query`` when the observation source is ``proxy``, as in Hubble),
  ``DNS Answer RCode: Non-Existent Domain TTL: 0 (Query example.com. A)``.

Dicts returned here share lists (labels, names, IPs) with the record: treat them as
read-only. Everything runs once per record, so the work is kept to building dicts.
"""
from __future__ import annotations

import time
from typing import Any

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
    Record,
    TrafficDirection,
    Verdict,
)

# Cilium monitor message types (pkg/monitor/api): what `event_type.type` says.
MESSAGE_TYPE_DROP = 1
MESSAGE_TYPE_TRACE = 4
MESSAGE_TYPE_ACCESS_LOG = 129
# Trace sub-types (observation points) for the pod's host-side interface.
TRACE_TO_ENDPOINT = 0
TRACE_FROM_ENDPOINT = 5

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Hubble prints flags in this order (pkg/hubble/parser/threefour getTCPFlags) …
_SUMMARY_FLAG_ORDER = ((0x02, "SYN"), (0x10, "ACK"), (0x04, "RST"), (0x01, "FIN"),
                       (0x08, "PSH"), (0x20, "URG"), (0x40, "ECE"), (0x80, "CWR"))
# … and protojson emits TCPFlags fields in declaration order.
_PROTO_FLAG_ORDER = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"),
                     (0x10, "ACK"), (0x20, "URG"), (0x40, "ECE"), (0x80, "CWR"))
# 256 flag bytes: precomputed once rather than rebuilt per record.
_FLAG_SUMMARY = tuple(
    ("TCP Flags: " + ", ".join(n for bit, n in _SUMMARY_FLAG_ORDER if b & bit)) if b else "TCP"
    for b in range(256)
)
_FLAG_NAMES = tuple(tuple(n for bit, n in _PROTO_FLAG_ORDER if b & bit) for b in range(256))

# gopacket's ICMP type/code names, which Hubble's summaries use.
_ICMPV4 = {
    0: ("EchoReply", None),
    3: ("DestinationUnreachable", {
        0: "Net", 1: "Host", 2: "Protocol", 3: "Port", 4: "FragmentationNeeded",
        5: "SourceRoutingFailed", 6: "NetUnknown", 7: "HostUnknown", 8: "SourceIsolated",
        9: "NetAdminProhibited", 10: "HostAdminProhibited", 11: "NetTOS", 12: "HostTOS",
        13: "CommAdminProhibited", 14: "HostPrecedence", 15: "PrecedenceCutoff"}),
    4: ("SourceQuench", None),
    5: ("Redirect", {0: "Net", 1: "Host", 2: "TOS+Net", 3: "TOS+Host"}),
    8: ("EchoRequest", None),
    9: ("RouterAdvertisement", None),
    10: ("RouterSolicitation", None),
    11: ("TimeExceeded", {0: "TTLExceeded", 1: "FragmentReassemblyTimeExceeded"}),
    12: ("ParameterProblem", {0: "PointerIndicatesError", 1: "MissingOption", 2: "BadLength"}),
    13: ("TimestampRequest", None),
    14: ("TimestampReply", None),
    15: ("InfoRequest", None),
    16: ("InfoReply", None),
    17: ("AddressMaskRequest", None),
    18: ("AddressMaskReply", None),
}
_ICMPV6 = {
    1: ("DestinationUnreachable", {
        0: "NoRouteToDst", 1: "AdminProhibited", 2: "BeyondScopeOfSrc", 3: "AddressUnreachable",
        4: "PortUnreachable", 5: "SrcAddressFailedPolicy", 6: "RejectRouteToDst"}),
    2: ("PacketTooBig", None),
    3: ("TimeExceeded", {0: "HopLimitExceeded", 1: "FragmentReassemblyTimeExceeded"}),
    4: ("ParameterProblem", {0: "ErroneousHeaderField", 1: "UnrecognizedNextHeader",
                             2: "UnrecognizedIPv6Option"}),
    128: ("EchoRequest", None),
    129: ("EchoReply", None),
    133: ("RouterSolicitation", None),
    134: ("RouterAdvertisement", None),
    135: ("NeighborSolicitation", None),
    136: ("NeighborAdvertisement", None),
    137: ("Redirect", None),
}

# gopacket's DNSResponseCode names (what Hubble prints and its metrics label).
DNS_RCODE_NAMES = {
    0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain",
    4: "Not Implemented", 5: "Query Refused", 6: "Name Exists when it should not",
    7: "RR Set Exists when it should not", 8: "RR Set that should exist does not",
    9: "Server Not Authoritative for zone", 10: "Name not contained in zone",
    16: "Bad OPT Version", 17: "Key not recognized", 18: "Signature out of time window",
    19: "Bad TKEY Mode", 20: "Duplicate key name", 21: "Algorithm not supported",
    22: "Bad Truncation", 23: "Bad/missing Server Cookie",
}

_ETHERTYPE_NAMES = {0x0806: "ARP", 0x8035: "RARP", 0x88CC: "LLDP", 0x8100: "Dot1Q",
                    0x88A8: "Dot1Q", 0x8847: "MPLS", 0x8848: "MPLS", 0x8863: "PPPoE",
                    0x8864: "PPPoE", 0x888E: "EAPOL", 0x86DD: "IPv6", 0x0800: "IPv4"}

# Cilium's reserved identities print by name in compact output, e.g. "(world)".
_RESERVED_IDENTITIES = {1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init",
                        6: "remote-node", 7: "kube-apiserver", 8: "ingress",
                        9: "world-ipv4", 10: "world-ipv6"}

_ANSI_RESET = "\x1b[0m"
_RED, _GREEN, _YELLOW, _MAGENTA, _CYAN = "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[35m", "\x1b[36m"
_VERDICT_COLORS = {Verdict.FORWARDED: _GREEN, Verdict.DROPPED: _RED, Verdict.ERROR: _RED,
                   Verdict.AUDIT: _YELLOW}

# Control characters (ANSI escapes, newlines) must not reach a terminal or split a line:
# DNS names and labels come from the network and from users.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}

# One entry: flows of a batch mostly share the second, so the calendar work is done once.
_second_cache: tuple[int, str, str] = (-1, "", "")


def _second_strings(sec: int) -> tuple[str, str]:
    global _second_cache
    cached = _second_cache
    if cached[0] == sec:
        return cached[1], cached[2]
    t = time.gmtime(sec)
    rfc = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    # Go's time.StampMilli without the millis: "Jan _2 15:04:05" (day padded with a space).
    stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    _second_cache = (sec, rfc, stamp)
    return rfc, stamp


def format_time(time_ns: int) -> str:
    """A protojson Timestamp: RFC 3339, UTC, ``Z``, 0/3/6/9 fractional digits."""
    sec, nanos = divmod(time_ns, 1_000_000_000)
    rfc = _second_strings(sec)[0]
    if nanos == 0:
        return rfc + "Z"
    if nanos % 1_000_000 == 0:
        return f"{rfc}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{rfc}.{nanos // 1_000:06d}Z"
    return f"{rfc}.{nanos:09d}Z"


def format_stamp(time_ns: int) -> str:
    """Hubble's compact timestamp (Go ``time.StampMilli`` in UTC): ``Nov 26 11:45:45.123``."""
    sec, nanos = divmod(time_ns, 1_000_000_000)
    return f"{_second_strings(sec)[1]}.{nanos // 1_000_000:03d}"


def _icmp_name(table: dict[int, tuple[str, dict[int, str] | None]], icmp_type: int, code: int) -> str:
    entry = table.get(icmp_type)
    if entry is None:
        return f"{icmp_type}({code})"
    name, codes = entry
    if codes is None:
        return name if code == 0 else f"{name}(Code: {code})"
    code_name = codes.get(code)
    return f"{name}({code_name})" if code_name is not None else f"{name}(Code: {code})"


def _go_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dns_summary(dns: DnsInfo, l7_type: str) -> str:
    """Hubble's DNS summary (pkg/hubble/parser/seven/dns.go), minus its empty-answer double space."""
    qtypes = ",".join(dns.qtypes)
    if l7_type == "RESPONSE":
        if dns.rcode:
            answer = "RCode: " + DNS_RCODE_NAMES.get(dns.rcode, "Unknown")
        else:
            parts = []
            if dns.ips:
                parts.append(_go_quote(",".join(dns.ips)))
            if dns.cnames:
                parts.append("CNAMEs: " + _go_quote(",".join(dns.cnames)))
            answer = " ".join(parts)
        source = "Proxy" if dns.observation_source == "proxy" else "Query"
        head = f"DNS Answer {answer} " if answer else "DNS Answer "
        tail = f"{source} {dns.query} {qtypes}" if qtypes else f"{source} {dns.query}"
        return f"{head}TTL: {dns.ttl} ({tail})"
    return f"DNS Query {dns.query} {qtypes}" if qtypes else f"DNS Query {dns.query}"


def summary(flow: Flow) -> str:
    """Hubble's ``Summary`` string for a flow (see the module docstring for the forms)."""
    if flow.l7 is not None:
        return dns_summary(flow.l7, flow.l7_type)
    if flow.ip_version == 0:
        name = _ETHERTYPE_NAMES.get(flow.ethertype)
        return name if name is not None else f"Ethernet 0x{flow.ethertype:04x}"
    proto = flow.protocol
    if proto == IPPROTO_TCP:
        return _FLAG_SUMMARY[flow.tcp_flags & 0xFF]
    if proto == IPPROTO_UDP:
        return "UDP"
    if proto == IPPROTO_ICMP:
        return "ICMPv4 " + _icmp_name(_ICMPV4, flow.src_port, flow.dst_port)
    if proto == IPPROTO_ICMPV6:
        return "ICMPv6 " + _icmp_name(_ICMPV6, flow.src_port, flow.dst_port)
    if proto == IPPROTO_SCTP:
        return "SCTP"
    return "IPv6" if flow.ip_version == 6 else "IPv4"


def _ports(flow: Flow) -> dict[str, int]:
    out: dict[str, int] = {}
    if flow.src_port:
        out["source_port"] = flow.src_port
    if flow.dst_port:
        out["destination_port"] = flow.dst_port
    return out


def _l4(flow: Flow) -> dict[str, Any] | None:
    proto = flow.protocol
    if proto == IPPROTO_TCP:
        tcp: dict[str, Any] = _ports(flow)
        # Hubble's L7 flows come from the proxy and carry no flags; packet flows always do.
        if flow.flow_type != FlowType.L7:
            tcp["flags"] = {name: True for name in _FLAG_NAMES[flow.tcp_flags & 0xFF]}
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


def endpoint_to_dict(ep: Endpoint) -> dict[str, Any]:
    """An ``Endpoint`` message; flowtel has no Cilium endpoint ``ID``, so none is emitted."""
    out: dict[str, Any] = {}
    if ep.identity:
        out["identity"] = ep.identity
    if ep.namespace:
        out["namespace"] = ep.namespace
    if ep.labels:
        out["labels"] = ep.labels
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


def _dns_to_dict(dns: DnsInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if dns.query:
        out["query"] = dns.query
    if dns.ips:
        out["ips"] = dns.ips
    if dns.ttl:
        out["ttl"] = dns.ttl
    if dns.cnames:
        out["cnames"] = dns.cnames
    if dns.observation_source:
        out["observation_source"] = dns.observation_source
    if dns.rcode:
        out["rcode"] = dns.rcode
    if dns.qtypes:
        out["qtypes"] = dns.qtypes
    if dns.rrtypes:
        out["rrtypes"] = dns.rrtypes
    return out


def _flow_dict(flow: Flow, when: str) -> dict[str, Any]:
    out: dict[str, Any] = {"time": when, "verdict": str(flow.verdict)}
    dropped = flow.verdict == Verdict.DROPPED
    is_l7 = flow.flow_type == FlowType.L7
    not_ip = flow.ip_version == 0

    if not_ip:
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
        out["source"] = endpoint_to_dict(flow.source)
    if flow.destination is not None:
        out["destination"] = endpoint_to_dict(flow.destination)
    out["Type"] = str(flow.flow_type)
    if flow.node_name:
        out["node_name"] = flow.node_name
    if flow.source_names:
        out["source_names"] = flow.source_names
    if flow.destination_names:
        out["destination_names"] = flow.destination_names
    if is_l7 or flow.l7 is not None:
        l7: dict[str, Any] = {}
        if flow.l7_type:
            l7["type"] = flow.l7_type
        if flow.latency_ns:
            l7["latency_ns"] = str(flow.latency_ns)  # uint64: a string in protojson
        if flow.l7 is not None:
            l7["dns"] = _dns_to_dict(flow.l7)
        out["l7"] = l7
    if flow.is_reply:
        out["reply"] = True  # deprecated twin of is_reply that Hubble still fills

    direction = flow.traffic_direction
    observation_point = None
    if is_l7:
        out["event_type"] = {"type": MESSAGE_TYPE_ACCESS_LOG}
    elif dropped:
        out["event_type"] = {"type": MESSAGE_TYPE_DROP}
    elif direction == TrafficDirection.EGRESS:
        out["event_type"] = {"type": MESSAGE_TYPE_TRACE, "sub_type": TRACE_FROM_ENDPOINT}
        observation_point = "FROM_ENDPOINT"
    elif direction == TrafficDirection.INGRESS:
        out["event_type"] = {"type": MESSAGE_TYPE_TRACE}  # sub_type TO_ENDPOINT is 0: omitted
        observation_point = "TO_ENDPOINT"
    else:
        out["event_type"] = {"type": MESSAGE_TYPE_TRACE}
    if direction != TrafficDirection.UNKNOWN:
        out["traffic_direction"] = str(direction)
    if observation_point is not None:
        out["trace_observation_point"] = observation_point
    if dropped and flow.drop_reason:
        out["drop_reason_desc"] = flow.drop_reason
    if flow.is_reply is not None:
        out["is_reply"] = flow.is_reply
    if flow.ifindex or flow.ifname:
        iface: dict[str, Any] = {}
        if flow.ifindex:
            iface["index"] = flow.ifindex
        if flow.ifname:
            iface["name"] = flow.ifname
        out["interface"] = iface
    out["Summary"] = summary(flow)

    extensions = dict(flow.extensions) if flow.extensions else {}
    if not is_l7 and (flow.packets or flow.bytes):
        extensions["packets"] = flow.packets
        extensions["bytes"] = flow.bytes
    if flow.tcp_flag_counts:
        extensions["tcp_flags"] = flow.tcp_flag_counts
    if not_ip:
        extensions["ethertype"] = f"0x{flow.ethertype:04x}"
    if extensions:
        out["extensions"] = extensions
    return out


def flow_to_dict(flow: Flow) -> dict[str, Any]:
    """The object ``hubble observe -o json`` prints under ``"flow"``."""
    return _flow_dict(flow, format_time(flow.time_ns))


def envelope(flow: Flow) -> dict[str, Any]:
    """Hubble's ``GetFlowsResponse``: what ``hubble observe -o json`` and its file exporter write."""
    when = format_time(flow.time_ns)
    out: dict[str, Any] = {"flow": _flow_dict(flow, when)}
    if flow.node_name:
        out["node_name"] = flow.node_name
    out["time"] = when
    return out


def lost_to_dict(lost: LostEvents) -> dict[str, Any]:
    """Hubble's ``LostEvent`` message (``num_events_lost`` is a uint64, hence a string)."""
    out: dict[str, Any] = {}
    if lost.source:
        out["source"] = lost.source
    if lost.count:
        out["num_events_lost"] = str(lost.count)
    return out


def lost_envelope(lost: LostEvents) -> dict[str, Any]:
    out: dict[str, Any] = {"lost_events": lost_to_dict(lost)}
    if lost.node_name:
        out["node_name"] = lost.node_name
    out["time"] = format_time(lost.time_ns)
    return out


def record_envelope(record: Record) -> dict[str, Any]:
    """The envelope for any record a logs pipeline carries."""
    if isinstance(record, Flow):
        return envelope(record)
    if isinstance(record, LostEvents):
        return lost_envelope(record)
    raise TypeError(f"not a flow-log record: {type(record).__name__}")


def _safe(text: str) -> str:
    return text if text.isprintable() else text.translate(_CONTROL)


def _paint(text: str, color: str, enabled: bool) -> str:
    return f"{color}{text}{_ANSI_RESET}" if enabled else text


def _host(flow: Flow, ep: Endpoint | None, ip: str, names: list[str], port: int, color: bool) -> str:
    # Hubble's Printer.Hostname: pod, else DNS names, else the address; ports for TCP/UDP/SCTP.
    if ep is not None and ep.pod_name:
        host = f"{ep.namespace}/{ep.pod_name}" if ep.namespace else ep.pod_name
    elif names:
        host = ",".join(names)
    elif ip:
        host = ip
    else:
        host = "N/A"
    host = _safe(host)
    has_port = port and flow.protocol in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP)
    if has_port and ":" in host:
        host = f"[{host}]"  # net.JoinHostPort brackets IPv6 literals
    host = _paint(host, _CYAN, color)
    if has_port:
        return f"{host}:{_paint(str(port), _YELLOW, color)}"
    return host


def _identity(ep: Endpoint | None, color: bool) -> str:
    ident = ep.identity if ep is not None else 0
    name = _RESERVED_IDENTITIES.get(ident)
    text = f"({name})" if name is not None else f"(ID:{ident})"
    return _paint(text, _MAGENTA, color)


def _event_column(flow: Flow) -> str:
    """Hubble's TYPE column: observation point, drop reason, or ``dns-request ebpf``."""
    if flow.flow_type == FlowType.L7:
        kind = (flow.l7_type or "unknown").lower()
        if flow.l7 is None:
            return f"l7-{kind}"
        source = flow.l7.observation_source
        return f"dns-{kind} {source}" if source else f"dns-{kind}"
    if flow.verdict == Verdict.DROPPED:
        return flow.drop_reason or "UNKNOWN"
    tcp_event = flow.extensions.get("tcp_event") if flow.extensions else None
    if tcp_event:
        return f"tcp-{tcp_event}"
    if flow.traffic_direction == TrafficDirection.INGRESS:
        return "to-endpoint"
    if flow.traffic_direction == TrafficDirection.EGRESS:
        return "from-endpoint"
    return "UNKNOWN"


def compact_line(flow: Flow, color: bool = False) -> str:
    """One ``hubble observe -o compact`` line, without the newline.

    As in Hubble, the arrow is ``->`` for a request, ``<-`` for a reply (with the ends
    swapped so the client stays on the left) and ``<>`` when it is unknown which it is.
    flowtel adds ``pkts=N bytes=N`` for aggregated flows and ``on IFACE DIRECTION``.
    """
    src = _host(flow, flow.source, flow.src_ip, flow.source_names, flow.src_port, color)
    dst = _host(flow, flow.destination, flow.dst_ip, flow.destination_names, flow.dst_port, color)
    src_id = _identity(flow.source, color)
    dst_id = _identity(flow.destination, color)
    if flow.is_reply is None:
        arrow = "<>"
    elif flow.is_reply:
        src, dst, src_id, dst_id = dst, src, dst_id, src_id
        arrow = "<-"
    else:
        arrow = "->"
    verdict = str(flow.verdict)
    if color:
        verdict_color = _VERDICT_COLORS.get(flow.verdict)
        if verdict_color is not None:
            verdict = _paint(verdict, verdict_color, True)
    line = (
        f"{format_stamp(flow.time_ns)}: {src} {src_id} {arrow} {dst} {dst_id} "
        f"{_safe(_event_column(flow))} {verdict} ({_safe(summary(flow))})"
    )
    if flow.flow_type == FlowType.L3_L4 and (flow.packets or flow.bytes):
        line += f" pkts={flow.packets} bytes={flow.bytes}"
    if flow.ifname or flow.ifindex:
        line += f" on {_safe(flow.ifname) if flow.ifname else f'ifindex {flow.ifindex}'}"
        if flow.traffic_direction != TrafficDirection.UNKNOWN:
            line += f" {flow.traffic_direction}"
    return line


def lost_compact_line(lost: LostEvents) -> str:
    """Hubble's ``EVENTS LOST: SOURCE N`` (no CPU: flowtel does not know it), with a timestamp."""
    return f"{format_stamp(lost.time_ns)}: EVENTS LOST: {_safe(lost.source)} {lost.count}"


def record_compact_line(record: Record, color: bool = False) -> str:
    """The compact line for any record a logs pipeline carries."""
    if isinstance(record, Flow):
        return compact_line(record, color)
    if isinstance(record, LostEvents):
        return lost_compact_line(record)
    raise TypeError(f"not a flow-log record: {type(record).__name__}")


TABLE_HEADER = ("TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")
_DICT_KEYS = ("  TIMESTAMP", "     SOURCE", "DESTINATION", "       TYPE", "    VERDICT", "    SUMMARY")
DICT_SEPARATOR = "------------"


def table_fields(flow: Flow) -> tuple[str, str, str, str, str, str]:
    """One row of ``hubble observe -o table``: the columns of :data:`TABLE_HEADER`.

    Unlike the compact line, the ends are not swapped for replies (Hubble's table shows
    source and destination as recorded).
    """
    return (
        format_stamp(flow.time_ns),
        _host(flow, flow.source, flow.src_ip, flow.source_names, flow.src_port, False),
        _host(flow, flow.destination, flow.dst_ip, flow.destination_names, flow.dst_port, False),
        _safe(_event_column(flow)),
        str(flow.verdict),
        _safe(summary(flow)),
    )


def dict_block(flow: Flow) -> str:
    """One ``hubble observe -o dict`` block (key: value lines; blocks are separated by
    :data:`DICT_SEPARATOR` lines), without a trailing newline."""
    return "\n".join(f"{key}: {value}" for key, value in zip(_DICT_KEYS, table_fields(flow)))
