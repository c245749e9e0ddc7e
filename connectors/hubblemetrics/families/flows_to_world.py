"""``flows-to-world``: hubble_flows_to_world_total {protocol, verdict} (+``port`` with option
``port``) for flows leaving the cluster; ``any-drop`` also counts drops, ``syn-only`` counts
only a TCP connection's SYN, as Hubble's options."""
from __future__ import annotations

from connectors.hubblemetrics.handler import Batch, Emit, Handler, MetricInfo, flow_events, flow_protocol, is_packet_flow
from connectors.hubblemetrics.options import ContextOptions, take_flag
from flowtel.records import IPPROTO_TCP, Flow, Verdict

NAME = "hubble_flows_to_world_total"
WORLD_IDENTITY = 2  # Cilium's reserved:world


def is_world(flow: Flow) -> bool:
    dst = flow.destination
    # Unenriched far ends are unknown, not world: counting them would call pod traffic external.
    if dst is None:
        return False
    return dst.identity == WORLD_IDENTITY or "reserved:world" in dst.labels


class FlowsToWorldHandler(Handler):
    def __init__(self, ctx: ContextOptions, port: bool, any_drop: bool, syn_only: bool) -> None:
        self.ctx = ctx
        self.port, self.any_drop, self.syn_only = port, any_drop, syn_only
        own = ("protocol", "verdict", "port") if port else ("protocol", "verdict")
        self.metrics = (MetricInfo(NAME, "Total number of flows to reserved:world", (*ctx.label_names, *own)),)

    def process(self, flow: Flow, emit: Emit) -> None:
        if not is_packet_flow(flow) or flow.is_reply or not is_world(flow):
            return
        if flow.verdict == Verdict.DROPPED and not self.any_drop:
            # Hubble counts only policy drops by default; flowtel sees kernel drops, not policy.
            return
        n: float = flow_events(flow)
        if self.syn_only and flow.protocol == IPPROTO_TCP:
            n = flow.tcp_flag_counts.syn if flow.tcp_flag_counts is not None else 0
            if not n:
                return
        own = (flow_protocol(flow), str(flow.verdict), *((str(flow.dst_port),) if self.port else ()))
        emit(NAME, (*self.ctx.values(flow), *own), n)


    def process_batch(self, batch: Batch, emit: Emit) -> None:
        process = self.process
        for flow in batch.flows:
            dst = flow.destination
            if dst is not None and (dst.identity == WORLD_IDENTITY or "reserved:world" in dst.labels):
                process(flow, emit)


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return FlowsToWorldHandler(ctx, take_flag(options, "port"), take_flag(options, "any-drop"),
                               take_flag(options, "syn-only"))
