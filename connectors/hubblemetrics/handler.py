"""What every family handler is: the metrics it declares, and one call per flow.

A handler parses its options once (in its ``create``) and, per flow, calls ``emit`` with the
metric name, the full label values (context labels first, then its own, in the declared order)
and the increment. The series store behind ``emit`` keeps the counters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flowtel.records import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Flow,
    FlowType,
    LostEvents,
    message_count,
)

Emit = Callable[[str, tuple[str, ...], float], None]

PROTOCOL_NAMES = {IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_ICMP: "ICMPv4", IPPROTO_ICMPV6: "ICMPv6",
                  IPPROTO_SCTP: "SCTP"}


@dataclass(frozen=True, slots=True)
class MetricInfo:
    name: str
    description: str
    label_names: tuple[str, ...]


class Handler:
    """One metric family (a Hubble ``metrics:`` entry). Subclasses override what they count."""

    metrics: tuple[MetricInfo, ...] = ()
    # Said once when the connector is built (e.g. a Hubble family flowtel has no data for).
    notice: str | None = None

    def process(self, flow: Flow, emit: Emit) -> None:
        pass

    def process_lost(self, event: LostEvents, emit: Emit) -> None:
        pass


def flow_protocol(flow: Flow) -> str:
    """Hubble's ``FlowProtocol``: the L7 protocol for L7 flows, else the L4 protocol name."""
    if flow.flow_type is FlowType.L7:
        return "DNS" if flow.l7 is not None else "Unknown L7"
    return PROTOCOL_NAMES.get(flow.protocol, "Unknown L4")


def is_packet_flow(flow: Flow) -> bool:
    """Whether the record stands for packets Hubble would have seen as flow events.

    TCP event records (retransmit, resets, flowtel's kernel tracepoints) and the extra record
    of an unanswered DNS query describe packets already counted elsewhere: counting them
    again would make rates differ from Hubble's.
    """
    ext = flow.extensions
    return "tcp_event" not in ext and not ext.get("dns_unanswered")


def flow_events(flow: Flow) -> int:
    """How many Hubble flow events the record stands for: an aggregated L3/L4 record holds
    ``packets`` packets, each of which Hubble reports as one flow; a DNS record is one message, or
    ``extensions.count`` of them when aggregated; a drop record is one."""
    if flow.flow_type is FlowType.L3_L4 and flow.packets > 0:
        return flow.packets
    if flow.flow_type is FlowType.L7:
        return message_count(flow)
    return 1
