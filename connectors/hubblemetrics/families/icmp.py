"""``icmp``: hubble_icmp_total {family, type}; ``type`` is the ICMP type's name where known."""
from __future__ import annotations

import operator
from typing import Any

from connectors.hubblemetrics.handler import Batch, Emit, Handler, MetricInfo, flow_events, is_packet_flow
from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import IPPROTO_ICMP, IPPROTO_ICMPV6, Flow

NAME = "hubble_icmp_total"
# As Hubble's icmp handler names them (cilium pkg/monitor/api icmp type names).
ICMPV4_TYPES = {0: "EchoReply", 3: "DestinationUnreachable", 5: "Redirect", 8: "EchoRequest",
                11: "TimeExceeded", 12: "ParameterProblem", 13: "Timestamp", 14: "TimestampReply"}
ICMPV6_TYPES = {1: "DestinationUnreachable", 2: "PacketTooBig", 3: "TimeExceeded", 4: "ParameterProblem",
                128: "EchoRequest", 129: "EchoReply", 133: "RouterSolicitation", 134: "RouterAdvertisement",
                135: "NeighborSolicitation", 136: "NeighborAdvertisement"}


class IcmpHandler(Handler):
    def __init__(self, ctx: ContextOptions) -> None:
        self.ctx = ctx
        self.metrics = (MetricInfo(NAME, "Number of ICMP messages", (*ctx.label_names, "family", "type")),)

    def process(self, flow: Flow, emit: Emit) -> None:
        if not is_packet_flow(flow):
            return
        # Records keep the ICMP type in src_port (flowtel.records.Flow).
        if flow.protocol == IPPROTO_ICMP:
            family, name = "IPv4", ICMPV4_TYPES.get(flow.src_port, str(flow.src_port))
        elif flow.protocol == IPPROTO_ICMPV6:
            family, name = "IPv6", ICMPV6_TYPES.get(flow.src_port, str(flow.src_port))
        else:
            return
        emit(NAME, (*self.ctx.values(flow), family, name), flow_events(flow))


    def process_batch(self, batch: Batch, emit: Emit) -> None:
        # Summed per (context, family, type) first; most records are not ICMP and cost a compare.
        groups: dict[tuple[int, int, int], list[Any]] = {}
        values = self.ctx.values  # per ICMP flow only (memoized per endpoint pair)
        for flow, n in batch.select(map(_IS_ICMP, map(_protocol, batch.flows))):
            context = values(flow)
            key = (id(context), flow.protocol, flow.src_port)
            group = groups.get(key)
            if group is None:
                groups[key] = [context, flow, n]
            else:
                group[2] += n
        for context, flow, n in groups.values():
            if flow.protocol == IPPROTO_ICMP:
                family, name = "IPv4", ICMPV4_TYPES.get(flow.src_port, str(flow.src_port))
            else:
                family, name = "IPv6", ICMPV6_TYPES.get(flow.src_port, str(flow.src_port))
            emit(NAME, (*context, family, name), n)


# C calls over a batch (Batch.select): most records are not ICMP.
_protocol = operator.attrgetter("protocol")
_IS_ICMP = frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6}).__contains__


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return IcmpHandler(ctx)
