"""``port-distribution``: hubble_port_distribution_total {protocol, port} of forwarded requests."""
from __future__ import annotations

from connectors.hubblemetrics.handler import Emit, Handler, MetricInfo, flow_events, is_packet_flow
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


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return PortDistributionHandler(ctx)
