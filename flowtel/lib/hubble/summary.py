"""Hubble's ``Summary`` string of a flow, as its parsers write it.

``TCP Flags: SYN, ACK`` (Hubble's flag order; a TCP flow with no flags seen is just
``TCP``), ``UDP``, ``SCTP``, ``ICMPv4 EchoRequest``,
``ICMPv6 DestinationUnreachable(PortUnreachable)`` (gopacket's type/code names),
``IPv4``/``IPv6`` for other protocols, ``ARP`` (or ``Ethernet 0x88b5``) for frames that
are not IP, ``DNS Query example.com. A``, ``DNS Answer "1.2.3.4" TTL: 300 (Query
example.com. A)`` (``Proxy`` instead of ``Query`` when the observation source is
``proxy``, as in Hubble), ``DNS Answer RCode: Non-Existent Domain TTL: 0 (Query
example.com. A)``. Records Hubble has no parser for say what they are:
``DNS Query example.com. A (no answer within the timeout)`` and ``TCP retransmit``,
``TCP reset sent``, ….
"""
from __future__ import annotations

from flowtel.records import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    DnsInfo,
    EventKind,
    Flow,
)
from flowtel.recordtables import DNS_RCODE_NAMES, TCP_SUMMARY_FLAG_ORDER

# 256 flag bytes: precomputed once rather than rebuilt per record.
_FLAG_SUMMARY = tuple(
    ("TCP Flags: " + ", ".join(n for bit, n in TCP_SUMMARY_FLAG_ORDER if b & bit)) if b else "TCP"
    for b in range(256)
)

_TCP_EVENT_SUMMARY = {
    EventKind.TCP_ESTABLISHED: "TCP connection established",
    EventKind.TCP_CLOSED: "TCP connection closed",
    EventKind.TCP_RETRANSMIT: "TCP retransmit",
    EventKind.TCP_RESET_SENT: "TCP reset sent",
    EventKind.TCP_RESET_RECEIVED: "TCP reset received",
}

# gopacket's ICMP type/code names, which Hubble's summaries use.
_ICMPV4: dict[int, tuple[str, dict[int, str] | None]] = {
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
_ICMPV6: dict[int, tuple[str, dict[int, str] | None]] = {
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

ETHERTYPE_NAMES = {0x0806: "ARP", 0x8035: "RARP", 0x88CC: "LLDP", 0x8100: "Dot1Q",
                   0x88A8: "Dot1Q", 0x8847: "MPLS", 0x8848: "MPLS", 0x8863: "PPPoE",
                   0x8864: "PPPoE", 0x888E: "EAPOL", 0x86DD: "IPv6", 0x0800: "IPv4"}


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


def dns_summary(dns: DnsInfo, kind: EventKind) -> str:
    """Hubble's DNS summary (pkg/hubble/parser/seven/dns.go), minus its empty-answer double space."""
    qtypes = ",".join(dns.qtypes)
    if kind is EventKind.DNS_RESPONSE:
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
    query = f"DNS Query {dns.query} {qtypes}" if qtypes else f"DNS Query {dns.query}"
    if kind is EventKind.DNS_UNANSWERED:
        return query + " (no answer within the timeout)"
    return query


def summary(flow: Flow) -> str:
    """Hubble's ``Summary`` string for a flow (see the module docstring for the forms)."""
    kind = flow.kind
    if flow.l7 is not None:
        return dns_summary(flow.l7, kind)
    if kind.is_tcp_event:
        return _TCP_EVENT_SUMMARY[kind]
    if flow.ip_version == 0:
        name = ETHERTYPE_NAMES.get(flow.ethertype)
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
