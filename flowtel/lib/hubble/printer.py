"""Hubble's text outputs for records: the compact line, the table and the dict block of
``hubble observe``, shared by the console exporter and ``flowtel observe``.

As in Hubble, the compact arrow is ``->`` for a request, ``<-`` for a reply (ends swapped so
the client stays on the left) and ``<>`` when it is unknown which it is. Every string that
came from the network or a user is printed with control characters escaped.
"""
from __future__ import annotations

from flowtel.lib.hubble.summary import summary
from flowtel.lib.hubble.timefmt import format_stamp
from flowtel.records import Endpoint, EventKind, Flow, LostEvents, Record, TrafficDirection, Verdict
from flowtel.recordtables import PORTED_PROTOCOLS

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

def _safe(text: str) -> str:
    return text if text.isprintable() else text.translate(_CONTROL)


def _paint(text: str, color: str, enabled: bool) -> str:
    return f"{color}{text}{_ANSI_RESET}" if enabled else text


def _host(flow: Flow, ep: Endpoint | None, ip: str, names: tuple[str, ...], port: int, color: bool) -> str:
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
    has_port = port and flow.protocol in PORTED_PROTOCOLS
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
    kind = flow.kind
    if kind.is_dns:
        word = {EventKind.DNS_REQUEST: "request", EventKind.DNS_RESPONSE: "response"}.get(kind, "unanswered")
        if flow.l7 is None:
            return f"l7-{word}"
        source = flow.l7.observation_source
        return f"dns-{word} {source}" if source else f"dns-{word}"
    if kind.is_tcp_event:
        return f"tcp-{kind.tcp_event}"
    if flow.verdict == Verdict.DROPPED:
        return flow.drop_reason or "UNKNOWN"
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
    if flow.is_packets and (flow.packets or flow.bytes):
        line += f" pkts={flow.packets} bytes={flow.bytes}"
    elif flow.kind is EventKind.DROP_SAMPLE:
        line += " sample"  # one of the drops a drop flow line counts, not one more
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
