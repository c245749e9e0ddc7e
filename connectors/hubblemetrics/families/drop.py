"""``drop``: hubble_drop_total {reason, protocol}, one per dropped packet. ``reason`` is the
Cilium ``DropReason`` name the flow carries on the wire (``POLICY_DENIED``, …;
``DROP_REASON_UNKNOWN`` where Cilium has no equivalent); the kernel's exact reason is in
``networkobservability_drop_count`` and in the flow's ``extensions``."""
from __future__ import annotations

import operator
from typing import Any

from connectors.hubblemetrics.handler import Batch, Emit, Handler, MetricInfo, flow_events, flow_protocol, is_packet_flow
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


    def process_batch(self, batch: Batch, emit: Emit) -> None:
        # Summed per (context, reason, protocol) first: a flood of drops is one update per series.
        groups: dict[tuple[object, ...], list[Any]] = {}
        values = self.ctx.values  # per dropped flow only (memoized per endpoint pair)
        for flow, n in batch.select(map(_DROPPED_EQ, map(_verdict, batch.flows))):
            context = values(flow)
            key = (id(context), flow.drop_reason, flow.protocol, flow.kind._value_, flow.l7 is None)
            group = groups.get(key)
            if group is None:
                groups[key] = [context, flow, n]
            else:
                group[2] += n
        for context, flow, n in groups.values():
            emit(NAME, (*context, cilium_drop_reason(flow.drop_reason), flow_protocol(flow)), n)


# C calls over a batch (Batch.select): a verdict is a StrEnum, so its __eq__ is str's.
_verdict = operator.attrgetter("verdict")
_DROPPED_EQ = Verdict.DROPPED.__eq__


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return DropHandler(ctx)
