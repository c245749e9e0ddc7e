"""The tables every reader of a record shares, defined once: protocol and TCP flag names,
DNS rcode words, Cilium's monitor event types and trace observation points, and how
flowtel's drop reasons and loss sources map onto Cilium's ``DropReason`` and
``LostEventSource`` enums.

Names are facts of the protocols flowtel speaks (Hubble's output, Cilium's ``flow.proto``,
gopacket's strings that Hubble prints); the choices where flowtel's datapath says something
Cilium's does not are documented at each table.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from flowtel.records import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_CWR,
    TCP_ECE,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TCP_URG,
    EventKind,
    Flow,
    message_count,
)

# -- protocols ----------------------------------------------------------------------------

# Hubble's L4 names (``flow.Layer4`` oneof members, the ``protocol`` label of its metrics).
PROTOCOL_NAMES: Mapping[int, str] = MappingProxyType({
    IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_SCTP: "SCTP", IPPROTO_ICMP: "ICMPv4", IPPROTO_ICMPV6: "ICMPv6",
})
PROTOCOL_BY_NAME: Mapping[str, int] = MappingProxyType({v: k for k, v in PROTOCOL_NAMES.items()})
# Protocols whose flows have ports (Hubble prints ``host:port`` and counts port distributions).
PORTED_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP})
ICMP_PROTOCOLS = frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6})

# -- TCP flags ----------------------------------------------------------------------------

# Flag bits in ``flow.TCPFlags`` field order (what protojson emits, in that order).
TCP_FLAG_NAMES: tuple[tuple[int, str], ...] = (
    (TCP_FIN, "FIN"), (TCP_SYN, "SYN"), (TCP_RST, "RST"), (TCP_PSH, "PSH"),
    (TCP_ACK, "ACK"), (TCP_URG, "URG"), (TCP_ECE, "ECE"), (TCP_CWR, "CWR"),
)
# Hubble's ``Summary`` order (pkg/hubble/parser/threefour getTCPFlags).
TCP_SUMMARY_FLAG_ORDER: tuple[tuple[int, str], ...] = (
    (TCP_SYN, "SYN"), (TCP_ACK, "ACK"), (TCP_RST, "RST"), (TCP_FIN, "FIN"),
    (TCP_PSH, "PSH"), (TCP_URG, "URG"), (TCP_ECE, "ECE"), (TCP_CWR, "CWR"),
)
# The flags ``hubble_tcp_flags_total`` counts, in Hubble's order of checks.
HUBBLE_METRIC_TCP_FLAGS = ("FIN", "SYN", "SYN-ACK", "RST")

# -- DNS ----------------------------------------------------------------------------------

# gopacket's DNSResponseCode words: Hubble's DNS summaries and the ``rcode`` label of its
# DNS metrics both use them (reference/metric-compat.md), never the mnemonics.
DNS_RCODE_NAMES: Mapping[int, str] = MappingProxyType({
    0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain",
    4: "Not Implemented", 5: "Query Refused", 6: "Name Exists when it should not",
    7: "RR Set Exists when it should not", 8: "RR Set that should exist does not",
    9: "Not Authorized", 10: "Name not contained in zone",
    16: "Bad OPT Version", 17: "Key not recognized", 18: "Signature out of time window",
    19: "Bad TKEY Mode", 20: "Duplicate key name", 21: "Algorithm not supported",
    22: "Bad Truncation", 23: "Bad/missing Server Cookie",
})


def rcode_name(rcode: int) -> str:
    """The word for ``rcode``, or its number for one without a name."""
    return DNS_RCODE_NAMES.get(rcode, str(rcode))


# -- Cilium monitor event types (pkg/monitor/api/types.go): ``event_type.type`` -------------

MESSAGE_TYPE_DROP = 1
MESSAGE_TYPE_TRACE = 4
MESSAGE_TYPE_POLICY_VERDICT = 5
MESSAGE_TYPE_TRACE_SOCK = 7
MESSAGE_TYPE_ACCESS_LOG = 129
MESSAGE_TYPE_AGENT = 130
# The names ``hubble observe --type`` accepts for them.
MESSAGE_TYPE_NAMES: Mapping[str, int] = MappingProxyType({
    "drop": MESSAGE_TYPE_DROP, "debug": 2, "capture": 3, "trace": MESSAGE_TYPE_TRACE,
    "policy-verdict": MESSAGE_TYPE_POLICY_VERDICT, "trace-sock": MESSAGE_TYPE_TRACE_SOCK,
    "l7": MESSAGE_TYPE_ACCESS_LOG, "agent": MESSAGE_TYPE_AGENT,
})

# Trace sub-types (observation points) at a pod's host-side interface: a packet the pod
# sent is FROM_ENDPOINT (5), one delivered to it TO_ENDPOINT (0).
TRACE_TO_ENDPOINT = 0
TRACE_FROM_ENDPOINT = 5

# -- drop reasons -------------------------------------------------------------------------

# Cilium's DropReason enum (api/v1/flow/flow.proto), the values flowtel emits or maps to.
CILIUM_DROP_REASONS: Mapping[str, int] = MappingProxyType({
    "DROP_REASON_UNKNOWN": 0,
    "INVALID_SOURCE_IP": 132,
    "POLICY_DENIED": 133,
    "INVALID_PACKET_DROPPED": 134,
    "UNSUPPORTED_L3_PROTOCOL": 139,
    "UNKNOWN_L4_PROTOCOL": 142,
    "INVALID_IPV6_EXTENSION_HEADER": 156,
    "FIB_LOOKUP_FAILED": 169,
    "SOCKET_LOOKUP_FAILED": 178,
    "TTL_EXCEEDED": 196,
})
# A kernel reason (enum skb_drop_reason, as tracefs names it) maps to a Cilium reason only
# where both name the same event; every other reason is DROP_REASON_UNKNOWN on the wire and
# keeps its exact name in ``extensions.drop_reason`` and in flowtel's own metrics.
# POLICY_DENIED is also what flowtel's FQDN datapath and DNS proxy report (they are policy).
KERNEL_TO_CILIUM_DROP: Mapping[str, str] = MappingProxyType({
    "POLICY_DENIED": "POLICY_DENIED",
    "NO_SOCKET": "SOCKET_LOOKUP_FAILED",        # no socket took the packet
    "IP_RPFILTER": "INVALID_SOURCE_IP",         # reverse-path (source address) check failed
    "IP_INVALID_SOURCE": "INVALID_SOURCE_IP",
    "PKT_TOO_SMALL": "INVALID_PACKET_DROPPED",  # malformed / truncated packets
    "IP_INHDR": "INVALID_PACKET_DROPPED",
    "HDR_TRUNC": "INVALID_PACKET_DROPPED",
    "IPV6DISABLED": "UNSUPPORTED_L3_PROTOCOL",
    "IP_NOPROTO": "UNKNOWN_L4_PROTOCOL",        # no handler for the IP protocol
    "IPV6_BAD_EXTHDR": "INVALID_IPV6_EXTENSION_HEADER",
    "IP_OUTNOROUTES": "FIB_LOOKUP_FAILED",      # no route: the FIB lookup failed
    "IP_INNOROUTES": "FIB_LOOKUP_FAILED",
})
# ``event_type.sub_type`` of a drop whose reason has no Cilium equivalent. Hubble prints a
# drop's TYPE column from its sub_type through Cilium's own table, where 0 reads "Success";
# 1 has no entry there, so Hubble prints the bare number instead of a false reason.
UNMAPPED_DROP_SUB_TYPE = 1


def cilium_drop_reason(reason: str) -> str:
    """The Cilium ``DropReason`` name for flowtel's drop reason ``reason`` (kernel or datapath)."""
    return KERNEL_TO_CILIUM_DROP.get(reason, "DROP_REASON_UNKNOWN")


def drop_sub_type(reason: str) -> int:
    """``event_type.sub_type`` of a drop: the numeric Cilium reason Hubble's printer shows."""
    mapped = KERNEL_TO_CILIUM_DROP.get(reason)
    return CILIUM_DROP_REASONS[mapped] if mapped is not None else UNMAPPED_DROP_SUB_TYPE


# -- lost events ---------------------------------------------------------------------------

# Cilium's LostEventSource. flowtel's sources are more precise; the enum says where, roughly:
# in the datapath before user space read it (every kernel map or ring flowtel reads), in the
# agent's queues (the pipeline's), or in the flow API's ring (a client too slow to keep up).
CILIUM_LOST_SOURCES: Mapping[str, int] = MappingProxyType({
    "UNKNOWN_LOST_EVENT_SOURCE": 0, "PERF_EVENT_RING_BUFFER": 1, "OBSERVER_EVENTS_QUEUE": 2,
    "HUBBLE_RING_BUFFER": 3,
})
_PIPELINE_LOSS_PREFIXES = ("QUEUE_FULL:", "EXPORT_FAILED:")


def cilium_lost_source(source: str) -> str:
    """The Cilium ``LostEventSource`` name for flowtel's loss source ``source``."""
    if source in CILIUM_LOST_SOURCES:
        return source
    if source.startswith(_PIPELINE_LOSS_PREFIXES):
        return "OBSERVER_EVENTS_QUEUE"
    return "PERF_EVENT_RING_BUFFER"  # lost in the kernel (a full map, ring or budget)


# -- what a flow counts as -----------------------------------------------------------------

def flow_events(flow: Flow) -> int:
    """How many Hubble flow events the record stands for: an aggregated packet or drop
    record holds ``packets`` packets, each of which Hubble reports as one flow; a DNS record is
    one message, or ``extensions.count`` of them when the kernel aggregated it; a TCP event
    record is one."""
    if flow.is_packets and flow.packets > 0:
        return flow.packets
    if flow.kind.is_dns:
        return message_count(flow)
    return 1


def counts_as_hubble_flow(flow: Flow) -> bool:
    """Whether Hubble would have seen this record as flow events of its own.

    TCP socket events, the record of an unanswered DNS query and a drop sample describe
    packets already counted by other records: counting them again would make rates differ
    from Hubble's (and a sampled drop count twice).
    """
    kind = flow.kind
    return not kind.is_tcp_event and kind is not EventKind.DNS_UNANSWERED and kind is not EventKind.DROP_SAMPLE
