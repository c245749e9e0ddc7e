"""The kernel-events source: drops and TCP health, hosted by the ``ebpf`` receiver.

It owns one bcc program (``bpf/kernel_events.c``) and one thread. The thread waits on the
ring buffer (at most ``poll_interval``), turns the events into flow records and passes them
on at once; every ``collection_interval`` it reads the kernel's cumulative counters into
metric points and reports newly lost events. Records of each signal go in their own batch,
and a signal no pipeline consumes is not produced (with no logs pipeline, the programs are
compiled without their event paths and only count).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import socket
import threading
import time
from typing import Any, Sequence

from flowtel.component import Consumer, Telemetry, consumer_wants
from flowtel.errors import StartError
from flowtel.records import EventKind, Flow, LostEvents, MetricPoint, Record
from receiver.ebpf import btf as btf_mod
from receiver.ebpf import tracefs
from receiver.ebpf.kernel_events import decode, program
from receiver.ebpf.kernel_events.config import KernelEventsConfig

log = logging.getLogger("flowtel.receiver.ebpf.kernel_events")

_REMEDY_KERNEL = (
    "run `flowtel doctor`; or switch this part off with kernel_events.drops.enabled / "
    "kernel_events.tcp.enabled set to false"
)


@functools.lru_cache(maxsize=4096)
def _kernel_symbol(address: int) -> str:
    from bcc import BPF

    name = BPF.ksym(address, show_module=False, show_offset=False).decode(errors="replace")
    return "" if name == "[unknown]" else name


def _host_ifname(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return ""  # gone since the drop


_CONNECTION_EVENTS = (EventKind.TCP_ESTABLISHED, EventKind.TCP_CLOSED)


class KernelEvents:
    """Drops (``skb:kfree_skb``) and TCP health (state changes, retransmissions, resets)."""

    def __init__(
        self,
        config: KernelEventsConfig,
        node_name: str,
        telemetry: Telemetry,
        consumer: Consumer,
        *,
        component_id: str = "ebpf",
    ) -> None:
        self.config = config
        self._node = node_name
        self._telemetry = telemetry
        self._consumer = consumer
        self._id = component_id
        self._bpf: Any = None
        self._programs: dict[str, tuple[str, str]] = {}
        self._names = decode.Names()
        self._decoder: decode.EventDecoder | None = None
        self._pending: list[bytes] = []
        self._lost_seen: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wants_logs = consumer_wants(consumer, "logs")
        self._wants_metrics = consumer_wants(consumer, "metrics")
        # The handshake RTT histogram is made from ESTABLISHED events, so a metrics pipeline
        # needs the connection events read even when no logs pipeline wants their flows.
        self._rtt_events = self._wants_metrics and config.tcp.enabled
        self._connection_flows = self._wants_logs and config.tcp.connection_events

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Compile and attach the programs, then start the thread; a :class:`StartError` if the
        kernel cannot do it. With drops and TCP both disabled, does nothing."""
        if not self.config.enabled:
            return
        try:
            facts = program.read_kernel_facts(self.config)
        except (tracefs.TracefsError, btf_mod.BtfError) as exc:
            raise StartError(self._id, f"kernel events: {exc}", _REMEDY_KERNEL) from None
        self._names = decode.Names(facts.drop_reasons, facts.tcp_states, facts.reset_reasons)
        text, cflags = program.build(facts, self.config, events=self._wants_logs, rtt_events=self._rtt_events)
        self._programs = program.programs_for(self.config)
        try:
            self._bpf = program.load_and_attach(text, cflags, self._programs)
        except Exception as exc:
            raise StartError(self._id, f"cannot compile or attach the kernel-event programs: {exc}",
                             _REMEDY_KERNEL) from None
        if self._wants_logs or self._rtt_events:
            ring = self._bpf["kernel_events"]
            self._decoder = decode.EventDecoder(
                self._bpf["kernel_event_layout"].Leaf,
                self._names,
                self._node,
                host_netns=os.stat("/proc/self/ns/net").st_ino,
                ifname=_host_ifname,
                symbol=_kernel_symbol,
            )
            ring.open_ring_buffer(self._on_event)
        self._thread = threading.Thread(target=self._run, name="flowtel-kernel-events", daemon=True)
        self._thread.start()
        log.info("kernel events attached: %s", ", ".join(f"{c}:{e}" for c, e in self._programs.values()))

    def stop(self) -> None:
        """Detach, then report what is still buffered and the final counters."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._bpf is None:
            return
        try:
            for category, event in self._programs.values():
                self._bpf.detach_tracepoint(f"{category}:{event}")
            if self._decoder is not None:
                self._bpf.ring_buffer_consume()
                self._emit(self._take_records())
            self._collect()
        finally:
            self._bpf.cleanup()
            self._bpf = None

    # -- reading (safe from any thread) --------------------------------------------------------

    def metrics(self) -> list[MetricPoint]:
        """The node-level metrics now (cumulative since the programs were attached)."""
        if self._bpf is None:
            return []
        now = time.time_ns()
        counters = self._counters()
        points: list[MetricPoint] = []
        if self.config.drops.enabled:
            points += decode.drop_points(self._drop_stats(), self._names, now)
        if self.config.tcp.enabled:
            # The histogram is whole only when every ESTABLISHED event is read.
            complete = self._rtt_events or self._connection_flows
            rtt = self._decoder.rtt if self._decoder is not None and complete else None
            points += decode.tcp_points(self._tcp_states(), counters, self._names, now, rtt)
        return points

    def tcp_connections(self) -> list[decode.TcpConnection]:
        """Sockets the kernel tracks now (those the tcp_state gauge counts)."""
        if self._bpf is None or not self.config.tcp.enabled:
            return []
        return [decode.connection(self._names, v) for _, v in self._bpf["tcp_conns"].items()]

    # -- the thread's work -----------------------------------------------------------------------

    def _poll(self, timeout: float) -> list[Flow]:
        """Wait up to ``timeout`` seconds for events; the records of those that arrived."""
        if self._decoder is None:
            self._stop.wait(timeout)
            return []
        self._bpf.ring_buffer_poll(max(0, int(timeout * 1000)))
        # The kernel does not announce every event (see submit() in kernel_events.c): a poll
        # that timed out leaves those in the buffer, so take them explicitly.
        self._bpf.ring_buffer_consume()
        return self._take_records()

    def _on_event(self, _ctx: Any, data: int, size: int) -> int:
        self._pending.append(ctypes.string_at(data, size))
        return 0

    def _take_records(self) -> list[Flow]:
        if not self._pending or self._decoder is None:
            return []
        pending, self._pending = self._pending, []
        size = self._decoder.size
        good = [p for p in pending if len(p) == size]
        if len(good) != len(pending):
            self._telemetry.add(self._id, "kernel_events_malformed", len(pending) - len(good))
        offset = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        flows = self._decoder.decode(b"".join(good), offset)
        if not self._connection_flows:  # read for the RTT histogram only
            flows = [f for f in flows if f.kind not in _CONNECTION_EVENTS]
        return flows

    def _run(self) -> None:
        interval = self.config.collection_interval
        next_at = time.monotonic() + interval
        while not self._stop.is_set():
            try:
                self._emit(self._poll(min(self.config.poll_interval, max(0.0, next_at - time.monotonic()))))
                if time.monotonic() >= next_at:
                    next_at += interval
                    self._collect()
            except Exception:  # one bad read must not end the source for the agent's life
                self._telemetry.add(self._id, "kernel_events_errors")
                log.exception("reading kernel events failed")
                self._stop.wait(1.0)

    def _collect(self) -> None:
        counters = self._counters()
        now = time.time_ns()
        lost: list[Record] = []
        for source, count in decode.lost_deltas(counters, self._lost_seen):
            self._telemetry.add(self._id, "kernel_events_lost", count)
            lost.append(LostEvents(now, source, count, self._node))
            log.warning("kernel events: %d lost (%s)", count, source)
        self._emit(lost)
        if self._wants_metrics:
            points: list[Record] = list(self.metrics())
            if points:
                self._consumer.consume(points)

    def _emit(self, records: Sequence[Record]) -> None:
        if records and self._wants_logs:
            self._telemetry.add(self._id, "records_out", len(records))
            self._consumer.consume(list(records))

    def _counters(self) -> decode.Counters:
        table = self._bpf["kev_counters"]
        return decode.Counters(tuple(int(table.sum(ctypes.c_int(i)).value) for i in range(decode.CNT_MAX)))

    def _drop_stats(self) -> dict[tuple[int, int], tuple[int, int]]:
        out: dict[tuple[int, int], tuple[int, int]] = {}
        for key, per_cpu in self._bpf["drop_stats"].items():
            out[(key.reason, key.direction)] = (sum(v.packets for v in per_cpu), sum(v.bytes for v in per_cpu))
        return out

    def _tcp_states(self) -> dict[int, int]:
        table = self._bpf["tcp_states"]
        return {i: int(table.sum(ctypes.c_int(i)).value) for i in range(len(table))}
