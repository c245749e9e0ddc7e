"""The ``flowaggregate`` processor: flows summed per key over fixed windows.

Keyed as ACNS container network logs aggregate: source and destination identity
(namespace/pod/workload, or the IP when the end is not a pod), destination port, protocol,
verdict, traffic direction, drop reason and record kind. Each window emits one new Flow per
key: packets, bytes and per-flag counts summed, flags united, ``extensions.flows`` (records
merged), ``window_start`` and ``window_end``; fields of one connection that the merged
records disagree on (source port, interface, DNS answer, …) are cleared.

Windows follow the agent's clock (records are assigned to the window open when they
arrive) and are aligned to multiples of ``window`` since the epoch. A window is emitted
when it ends: by the pipeline's timer (:meth:`tick`, every ``window / 10`` seconds, at
least every second and at most every 50 ms) when no flows arrive, else with the first
batch after its end; the last one through :meth:`flush` at shutdown. The pipeline never
runs ``process``, ``tick`` and ``flush`` concurrently, so the window needs no lock.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Hashable

from flowtel.component import CreateSettings, Processor
from flowtel.lib.hubble.timefmt import format_time
from flowtel.records import FLOW_DEFAULTS, Endpoint, EventKind, Flow, Record, TcpFlagCounts, frozen_extensions, replace
from processors.flowaggregate.config import FlowAggregateConfig

# Fields of one connection or message that the key does not fix: an aggregate keeps each
# only while every merged record agrees on it, else clears it to the default (a source
# port of 0, an unknown reply flag, no interface, …) rather than show one record's value.
_PER_RECORD: tuple[str, ...] = ("src_port", "is_reply", "ifindex", "ifname", "ethertype", "l7", "latency_ns",
                                "source_names", "destination_names", "extensions")
_CLEARED: dict[str, Any] = {name: FLOW_DEFAULTS[name] for name in _PER_RECORD}
_DIFFERS = object()


def _identity(ep: Endpoint | None, ip: str) -> tuple[str, str, str, str]:
    if ep is not None and ep.pod_name:
        workload = f"{ep.workloads[0].kind}/{ep.workloads[0].name}" if ep.workloads else ""
        return (ep.namespace, ep.pod_name, workload, "")
    return ("", "", "", ip)


def flow_key(f: Flow) -> tuple[Hashable, ...]:
    return (
        _identity(f.source, f.src_ip),
        _identity(f.destination, f.dst_ip),
        f.dst_port,
        f.protocol,
        f.verdict,
        f.traffic_direction,
        f.drop_reason,
        f.kind,
    )


class _Agg:
    __slots__ = ("first", "packets", "bytes", "flows", "tcp_flags", "flag_counts", "same")

    def __init__(self, first: Flow) -> None:
        self.first = first
        self.packets = 0
        self.bytes = 0
        self.flows = 0
        self.tcp_flags = 0
        self.flag_counts: TcpFlagCounts | None = None
        self.same = [getattr(first, name) for name in _PER_RECORD]

    def add(self, f: Flow) -> None:
        self.packets += f.packets
        self.bytes += f.bytes
        self.flows += 1
        self.tcp_flags |= f.tcp_flags
        counts = f.tcp_flag_counts
        if counts is not None:
            self.flag_counts = counts if self.flag_counts is None else self.flag_counts + counts
        same = self.same
        for i, name in enumerate(_PER_RECORD):
            if same[i] is not _DIFFERS and getattr(f, name) != same[i]:
                same[i] = _DIFFERS

    def record(self, start: int, end: int) -> Flow:
        kept = {name: (_CLEARED[name] if value is _DIFFERS else value) for name, value in zip(_PER_RECORD, self.same)}
        kept["extensions"] = frozen_extensions({
            **kept["extensions"],
            "flows": self.flows,
            # RFC 3339 strings: extensions are a google.protobuf.Struct, whose numbers are
            # doubles that cannot hold nanosecond timestamps exactly.
            "window_start": format_time(start),
            "window_end": format_time(end),
        })
        return replace(self.first, time_ns=end, packets=self.packets, bytes=self.bytes,
                                   tcp_flags=self.tcp_flags, tcp_flag_counts=self.flag_counts, **kept)


class FlowAggregateProcessor(Processor):
    def __init__(self, settings: CreateSettings, config: FlowAggregateConfig, clock: Callable[[], int] = time.time_ns) -> None:
        super().__init__(settings)
        self.config = config
        self._clock = clock
        self._window_ns = int(config.window * 1e9)
        # How late after its end a window may be emitted when no flows arrive; not below
        # 50 ms, so a tiny window cannot turn the pipeline's timer into a busy loop.
        self.tick_interval = max(0.05, min(1.0, config.window / 10))
        self._start_ns: int | None = None
        self._aggs: dict[tuple[Hashable, ...], _Agg] = {}
        settings.telemetry.register_gauge(settings.id, "aggregation_keys", lambda: len(self._aggs))

    def _wanted(self, r: Record) -> bool:
        if not isinstance(r, Flow):
            return False
        kind = r.kind
        if kind is EventKind.PACKET:
            return self.config.l4
        if kind is EventKind.DROP:
            return self.config.drops
        if kind.is_dns:
            return self.config.dns
        return False  # TCP socket events are events, not packets: they pass through

    def process(self, batch: list[Record]) -> list[Record]:
        now = self._clock()
        out: list[Record] = []
        if self._start_ns is not None and now >= self._start_ns + self._window_ns:
            out.extend(self._emit())
        if self._start_ns is None:
            self._start_ns = now - now % self._window_ns
        aggs = self._aggs
        overflow = taken = 0
        for r in batch:
            if not isinstance(r, Flow) or not self._wanted(r):
                out.append(r)
                continue
            key = flow_key(r)
            agg = aggs.get(key)
            if agg is None:
                if len(aggs) >= self.config.max_keys:
                    overflow += 1
                    out.append(r)
                    continue
                agg = aggs[key] = _Agg(r)
            agg.add(r)
            taken += 1
        tel, cid = self.settings.telemetry, self.settings.id
        tel.add(cid, "records_aggregated", taken)
        # Flows of new keys once max_keys are held pass through unaggregated, counted.
        tel.add(cid, "records_overflow", overflow)
        return out

    def _emit(self) -> list[Record]:
        start = self._start_ns
        self._start_ns = None
        aggs, self._aggs = self._aggs, {}
        if start is None or not aggs:
            return []
        end = start + self._window_ns
        out: list[Record] = [agg.record(start, end) for agg in aggs.values()]
        self.settings.telemetry.add(self.settings.id, "windows_emitted")
        return out

    def tick(self) -> list[Record]:
        """The open window, once it has ended (no flows arrived since to close it)."""
        if self._start_ns is not None and self._clock() >= self._start_ns + self._window_ns:
            return self._emit()
        return []

    def flush(self) -> list[Record]:
        return self._emit()
