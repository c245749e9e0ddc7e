"""``flow``: hubble_flows_processed_total {protocol, type, subtype, verdict}."""
from __future__ import annotations

from typing import Any

from connectors.hubblemetrics.handler import Batch, Emit, Handler, MetricInfo, flow_events, flow_protocol, is_packet_flow
from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import Flow, TrafficDirection, Verdict, flow_fields

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
        # Full label tuples by (context values, what the family's own labels depend on): the
        # context tuple is shared per endpoint pair, so most flows are one dict hit.
        self._labels: dict[tuple[object, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def process(self, flow: Flow, emit: Emit) -> None:
        if not is_packet_flow(flow):
            return
        emit(NAME, self._labels_of(self.ctx.values(flow), flow), flow_events(flow))

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        # Grouped by what the labels depend on (the context tuple is shared per endpoint
        # pair, so its id stands for it while the batch holds it): one series update per group.
        groups: dict[tuple[object, ...], list[Any]] = {}
        for flow, context, n in zip(batch.flows, batch.contexts(self.ctx), batch.events):
            key = (id(context), _label_fields(flow), flow.l7 is None)
            group = groups.get(key)
            if group is None:
                groups[key] = [context, flow, n]
            else:
                group[2] += n
        for context, flow, n in groups.values():
            emit(NAME, self._labels_of(context, flow), n)

    def _labels_of(self, context: tuple[str, ...], flow: Flow) -> tuple[str, ...]:
        key = (id(context), flow.protocol, flow.kind._value_, flow.verdict._value_, flow.traffic_direction._value_,
               flow.l7 is None)
        hit = self._labels.get(key)
        if hit is not None and hit[0] is context:
            return hit[1]
        if flow.kind.is_dns:
            kind, subtype = "L7", "DNS" if flow.l7 is not None else ""
        elif flow.verdict == Verdict.DROPPED:
            kind, subtype = "Drop", ""
        else:
            kind, subtype = "Trace", observation_point(flow)
        labels = (*context, flow_protocol(flow), kind, subtype, str(flow.verdict))
        if len(self._labels) >= 65536:
            self._labels.clear()  # a new working set: start again rather than grow
        self._labels[key] = (context, labels)  # holds the context tuple, so its id stays its own
        return labels


# What the family's own labels depend on, read in one C call (kinds hash by identity and
# the StrEnums as their strings, all in C).
_label_fields = flow_fields("protocol", "kind", "verdict", "traffic_direction")


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return FlowHandler(ctx)
