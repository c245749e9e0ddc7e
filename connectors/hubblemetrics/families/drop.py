"""``drop``: hubble_drop_total {reason, protocol}, one per dropped packet. ``reason`` is the
Cilium ``DropReason`` name the flow carries on the wire (``POLICY_DENIED``, …;
``DROP_REASON_UNKNOWN`` where Cilium has no equivalent); the kernel's exact reason is in
``networkobservability_drop_count`` and in the flow's ``extensions``."""
from __future__ import annotations

from connectors.hubblemetrics.handler import Emit, Handler, MetricInfo, flow_events, flow_protocol, is_packet_flow
from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import Flow, Verdict
from flowtel.recordtables import cilium_drop_reason

NAME = "hubble_drop_total"


class DropHandler(Handler):
    def __init__(self, ctx: ContextOptions) -> None:
        self.ctx = ctx
        self.metrics = (MetricInfo(NAME, "Number of drops", (*ctx.label_names, "reason", "protocol")),)

    def process(self, flow: Flow, emit: Emit) -> None:
        if flow.verdict != Verdict.DROPPED or not is_packet_flow(flow):
            return
        emit(NAME, (*self.ctx.values(flow), cilium_drop_reason(flow.drop_reason), flow_protocol(flow)),
             flow_events(flow))


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return DropHandler(ctx)
