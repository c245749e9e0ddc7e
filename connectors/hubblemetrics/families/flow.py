"""``flow``: hubble_flows_processed_total {protocol, type, subtype, verdict}."""
from __future__ import annotations

from connectors.hubblemetrics.handler import Emit, Handler, MetricInfo, flow_events, flow_protocol, is_packet_flow
from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import Flow, TrafficDirection, Verdict

NAME = "hubble_flows_processed_total"


def observation_point(flow: Flow) -> str:
    """Hubble's trace ``subtype`` name. As in flowtel's Hubble JSON (flowtel/lib/hubble/convert.py), the
    observation point follows from the pod's direction: EGRESS was seen leaving the pod
    (``from-endpoint``), INGRESS entering it (``to-endpoint``)."""
    if flow.traffic_direction is TrafficDirection.EGRESS:
        return "from-endpoint"
    if flow.traffic_direction is TrafficDirection.INGRESS:
        return "to-endpoint"
    return ""


class FlowHandler(Handler):
    def __init__(self, ctx: ContextOptions) -> None:
        self.ctx = ctx
        self.metrics = (MetricInfo(NAME, "Total number of flows processed",
                                   (*ctx.label_names, "protocol", "type", "subtype", "verdict")),)

    def process(self, flow: Flow, emit: Emit) -> None:
        if not is_packet_flow(flow):
            return
        if flow.kind.is_dns:
            kind, subtype = "L7", "DNS" if flow.l7 is not None else ""
        elif flow.verdict == Verdict.DROPPED:
            kind, subtype = "Drop", ""
        else:
            kind, subtype = "Trace", observation_point(flow)
        labels = (*self.ctx.values(flow), flow_protocol(flow), kind, subtype, str(flow.verdict))
        emit(NAME, labels, flow_events(flow))


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return FlowHandler(ctx)
