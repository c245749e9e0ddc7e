"""The ``flowaggregate`` processor: flows summed per key over fixed windows.

Keyed as ACNS container network logs aggregate: source and destination identity
(namespace/pod/workload, or the IP when the end is not a pod), destination port, protocol,
verdict, traffic direction and drop reason. Each window emits one Flow per key with the
sums in ``extensions`` (``packets``, ``bytes``, ``flows``, ``window_start``, ``window_end``).

Windows follow the agent's clock (records are assigned to the window open when they
arrive) and are aligned to multiples of ``window`` since the epoch. A window is emitted
when it ends: by the pipeline's timer (:meth:`tick`, every ``window / 10`` seconds, at
least every second and at most every 50 ms) when no flows arrive, else with the first
batch after its end; the last one through :meth:`flush` at shutdown. The pipeline never
runs ``process``, ``tick`` and ``flush`` concurrently, so the window needs no lock.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Hashable

from flowtel.component import CreateSettings, Processor
from flowtel.records import Endpoint, Flow, FlowType, Record, Verdict, message_count
from processors.flowaggregate.config import FlowAggregateConfig


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
        f.flow_type,
        f.l7_type,
    )


class _Agg:
    __slots__ = ("first", "packets", "bytes", "flows", "tcp_flags")

    def __init__(self, first: Flow) -> None:
        self.first = first
        self.packets = 0
        self.bytes = 0
        self.flows = 0
        self.tcp_flags = 0

    def add(self, f: Flow) -> None:
        self.packets += f.packets or int(f.extensions.get("packets", 0))
        self.bytes += f.bytes or int(f.extensions.get("bytes", 0))
        self.flows += message_count(f)  # an aggregated DNS record stands for several
        self.tcp_flags |= f.tcp_flags


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
        if r.flow_type is FlowType.L7:
            return self.config.dns and r.l7 is not None
        if r.verdict is Verdict.DROPPED:
            return self.config.drops
        return self.config.l4

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
            if not self._wanted(r):
                out.append(r)
                continue
            key = flow_key(r)  # type: ignore[arg-type]
            agg = aggs.get(key)
            if agg is None:
                if len(aggs) >= self.config.max_keys:
                    overflow += 1
                    out.append(r)
                    continue
                agg = aggs[key] = _Agg(r)  # type: ignore[arg-type]
            agg.add(r)  # type: ignore[arg-type]
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
        out: list[Record] = []
        for agg in aggs.values():
            f = dataclasses.replace(agg.first, time_ns=end, packets=agg.packets, bytes=agg.bytes, tcp_flags=agg.tcp_flags)
            f.extensions = {
                **agg.first.extensions,
                "packets": agg.packets,
                "bytes": agg.bytes,
                "flows": agg.flows,
                "window_start": start,
                "window_end": end,
            }
            out.append(f)
        self.settings.telemetry.add(self.settings.id, "windows_emitted")
        return out

    def tick(self) -> list[Record]:
        """The open window, once it has ended (no flows arrived since to close it)."""
        if self._start_ns is not None and self._clock() >= self._start_ns + self._window_ns:
            return self._emit()
        return []

    def flush(self) -> list[Record]:
        return self._emit()
