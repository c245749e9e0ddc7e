"""``tcp``: hubble_tcp_flags_total {flag, family} over forwarded TCP packets.

Hubble counts each packet's flags; an aggregated record carries per-flag packet counts in
``tcp_flag_counts`` (SYN without ACK, SYN-ACK, FIN, RST), which give the same totals. Records
without counts (older receivers) fall back to the union of flags, once each.
"""
from __future__ import annotations

from typing import Any

from connectors.hubblemetrics.handler import Batch, Emit, Handler, MetricInfo, is_packet_flow
from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Flow, Verdict, flow_fields
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

    def _flag_labels(self, flow: Flow, context: tuple[str, ...] | None = None) -> dict[str, tuple[str, ...]]:
        if context is None:
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


    def process_batch(self, batch: Batch, emit: Emit) -> None:
        # Per-flag packet counts summed per (context, family) first: one update per series.
        groups: dict[tuple[int, int], list[Any]] = {}
        forwarded = Verdict.FORWARDED
        for flow, context in zip(batch.flows, batch.contexts(self.ctx)):
            protocol, verdict, c, ip_version = _tcp_fields(flow)
            if protocol != IPPROTO_TCP or verdict != forwarded:
                continue
            if c is not None:
                fin, syn, syn_ack, rst = c.fin, c.syn, c.syn_ack, c.rst
            else:
                u = _union_counts(flow.tcp_flags)
                fin, syn, syn_ack, rst = u["FIN"], u["SYN"], u["SYN-ACK"], u["RST"]
            if not (fin or syn or syn_ack or rst):
                continue
            key = (id(context), ip_version)
            group = groups.get(key)
            if group is None:
                groups[key] = [context, flow, fin, syn, syn_ack, rst]
            else:
                group[2] += fin
                group[3] += syn
                group[4] += syn_ack
                group[5] += rst
        for context, flow, fin, syn, syn_ack, rst in groups.values():
            labels = self._flag_labels(flow, context)
            counts = {"FIN": fin, "SYN": syn, "SYN-ACK": syn_ack, "RST": rst}
            for flag in FLAGS:
                n = counts[flag]
                if n:
                    emit(NAME, labels[flag], n)


_tcp_fields = flow_fields("protocol", "verdict", "tcp_flag_counts", "ip_version")


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return TcpHandler(ctx)
