"""``tcp``: hubble_tcp_flags_total {flag, family} over forwarded TCP packets.

Hubble counts each packet's flags; an aggregated record carries per-flag packet counts in
``tcp_flag_counts`` (SYN without ACK, SYN-ACK, FIN, RST), which give the same totals. Records
without counts (older receivers) fall back to the union of flags, once each.
"""
from __future__ import annotations

from connectors.hubblemetrics.handler import Emit, Handler, MetricInfo, is_packet_flow
from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Flow, Verdict
from flowtel.recordtables import HUBBLE_METRIC_TCP_FLAGS as FLAGS

NAME = "hubble_tcp_flags_total"


def _union_counts(bits: int) -> dict[str, int]:
    syn = bool(bits & TCP_SYN)
    return {"FIN": int(bool(bits & TCP_FIN)), "SYN": int(syn and not bits & TCP_ACK),
            "SYN-ACK": int(syn and bool(bits & TCP_ACK)), "RST": int(bool(bits & TCP_RST))}


class TcpHandler(Handler):
    def __init__(self, ctx: ContextOptions) -> None:
        self.ctx = ctx
        self.metrics = (MetricInfo(NAME, "TCP flag occurrences", (*ctx.label_names, "flag", "family")),)

    def process(self, flow: Flow, emit: Emit) -> None:
        if flow.protocol != IPPROTO_TCP or flow.verdict != Verdict.FORWARDED or not is_packet_flow(flow):
            return
        counts = flow.tcp_flag_counts.as_dict() if flow.tcp_flag_counts is not None else _union_counts(flow.tcp_flags)
        family = "IPv6" if flow.ip_version == 6 else "IPv4"
        context = None
        for flag in FLAGS:
            n = counts.get(flag, 0)
            if n:
                if context is None:
                    context = self.ctx.values(flow)
                emit(NAME, (*context, flag, family), n)


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return TcpHandler(ctx)
