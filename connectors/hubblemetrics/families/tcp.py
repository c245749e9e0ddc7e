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
        # Label tuples per flag, by (context values, family): built once per endpoint pair.
        self._labels: dict[tuple[int, int], tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {}

    def _flag_labels(self, flow: Flow) -> dict[str, tuple[str, ...]]:
        context = self.ctx.values(flow)
        key = (id(context), flow.ip_version)
        hit = self._labels.get(key)
        if hit is not None and hit[0] is context:
            return hit[1]
        family = "IPv6" if flow.ip_version == 6 else "IPv4"
        by_flag = {flag: (*context, flag, family) for flag in FLAGS}
        if len(self._labels) >= 65536:
            self._labels.clear()
        self._labels[key] = (context, by_flag)  # holds the context tuple, so its id stays its own
        return by_flag

    def process(self, flow: Flow, emit: Emit) -> None:
        if flow.protocol != IPPROTO_TCP or flow.verdict != Verdict.FORWARDED or not is_packet_flow(flow):
            return
        c = flow.tcp_flag_counts
        if c is not None:
            if not (c.fin or c.syn or c.syn_ack or c.rst):
                return
            counts = {"FIN": c.fin, "SYN": c.syn, "SYN-ACK": c.syn_ack, "RST": c.rst}
        else:
            counts = _union_counts(flow.tcp_flags)
        labels = None
        for flag in FLAGS:
            n = counts[flag]
            if n:
                if labels is None:
                    labels = self._flag_labels(flow)
                emit(NAME, labels[flag], n)


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return TcpHandler(ctx)
