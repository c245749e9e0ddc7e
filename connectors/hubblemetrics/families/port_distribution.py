"""``port-distribution``: hubble_port_distribution_total {protocol, port} of forwarded requests."""
from __future__ import annotations

from typing import Any

from connectors.hubblemetrics.handler import Batch, Emit, Handler, MetricInfo, flow_events, is_packet_flow
from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, EventKind, Flow, Verdict

NAME = "hubble_port_distribution_total"
_PORTED = {IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_SCTP: "SCTP"}


class PortDistributionHandler(Handler):
    def __init__(self, ctx: ContextOptions) -> None:
        self.ctx = ctx
        self.metrics = (MetricInfo(NAME, "Numbers of packets distributed by destination port",
                                   (*ctx.label_names, "protocol", "port")),)

    def process(self, flow: Flow, emit: Emit) -> None:
        # Hubble counts forwarded L3/L4 non-reply flows; a record whose reply bit is unknown
        # (None) is counted, as Hubble does when is_reply is unset.
        if (flow.verdict != Verdict.FORWARDED or flow.kind is not EventKind.PACKET or flow.is_reply
                or not is_packet_flow(flow)):
            return
        protocol = _PORTED.get(flow.protocol)
        if protocol is None:
            return
        emit(NAME, (*self.ctx.values(flow), protocol, str(flow.dst_port)), flow_events(flow))


    def process_batch(self, batch: Batch, emit: Emit) -> None:
        # Summed per (context, protocol, port) first: one update per series.
        groups: dict[tuple[int, int, int], list[Any]] = {}
        packet = EventKind.PACKET
        for flow, context, n in zip(batch.flows, batch.contexts(self.ctx), batch.events):
            if flow.verdict != Verdict.FORWARDED or flow.kind is not packet or flow.is_reply:
                continue
            protocol = flow.protocol
            if protocol not in _PORTED:
                continue
            key = (id(context), protocol, flow.dst_port)
            group = groups.get(key)
            if group is None:
                groups[key] = [context, flow, n]
            else:
                group[2] += n
        for context, flow, n in groups.values():
            emit(NAME, (*context, _PORTED[flow.protocol], str(flow.dst_port)), n)


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return PortDistributionHandler(ctx)
