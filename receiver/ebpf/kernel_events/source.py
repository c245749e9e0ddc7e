"""The kernel-events source: drops and TCP health, hosted by the ``ebpf`` receiver.

It owns the tracepoint programs of ``bpf/kernel_events.c`` and one thread. The receiver
compiles them into its own bcc module, beside the tc programs (one LLVM per agent:
:meth:`KernelEvents.prepare` gives the source, :meth:`KernelEvents.start` attaches within the
module it is given); alone (tests, benches) the source compiles its own.

Nothing crosses per drop or per connection: drops are counted per flow, and connections
established and closed per (local and remote address, server port, role, event, state left),
in the kernel's double-buffered maps, drained every ``collection_interval`` into drop flow and
connection records. Only with ``drops.events_per_second`` set do some drops also come one by
one, as samples within a per-CPU budget the kernel enforces, through the ring buffer below.
TCP events that are wanted as records one by one (retransmit, reset) come through that ring
buffer, which the kernel announces only every few events; the thread takes them at most
``poll_interval`` late, in batches. Every ``collection_interval`` it also reads the kernel's cumulative counters into
metric points and reports newly lost events. Records of each signal go in their own batch, and
a signal no pipeline consumes is not produced (with no logs pipeline, the programs are compiled
without their event paths and drop flow maps, and only count).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

from flowtel.component import Consumer, Telemetry, consumer_wants, wait_consumed
from flowtel.errors import StartError
from flowtel.lib.bpf import btf as btf_mod
from flowtel.lib.bpf import kallsyms
from flowtel.lib.bpf import tracefs
from flowtel.lib.bpf.batch import read_batch
from flowtel.lib.bpf.doublebuffer import DRAIN_CHUNK_RECORDS, DoubleBuffer
from flowtel.lib.bpf.earlydrain import FILL_POLL_S, Drain, EarlyDrain
from flowtel.lib.bpf import proginfo
from flowtel.lib.bpf.ringbuf import RingReader
from flowtel.records import EventKind, Flow, LostEvents, MetricPoint, Record
from receiver.ebpf.kernel_events import decode, dropcache, program
from receiver.ebpf.kernel_events.config import KernelEventsConfig

log = logging.getLogger("flowtel.receiver.ebpf.kernel_events")

T = TypeVar("T")

_REMEDY_KERNEL = (
    "run `flowtel doctor`; or switch this part off with kernel_events.drops.enabled / "
    "kernel_events.tcp.enabled set to false"
)


@functools.lru_cache(maxsize=4096)
def _kernel_symbol(address: int) -> str:
    # Not bcc's BPF.ksym: that keeps every kernel symbol resident (~13 MB) for a handful of names.
    return kallsyms.symbol(address)


def _host_ifname(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return ""  # gone since the drop


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
        self._owns_bpf = False
        self._programs: dict[str, tuple[str, str]] | None = None
        self._names = decode.Names()
        self._decoder: decode.EventDecoder | None = None
        self._ring: RingReader | None = None
        self._drops: DoubleBuffer[decode.RawDrop] | None = None
        self._drop_decoder: decode.DropDecoder | None = None
        self._conns: DoubleBuffer[decode.RawConn] | None = None
        self._conn_decoder: decode.ConnDecoder | None = None
        self._drop_early: EarlyDrain | None = None
        self._conn_early: EarlyDrain | None = None
        self._pending: list[bytes] = []
        self._lost_seen: dict[int, int] = {}
        self._misses_seen = 0
        self._last_counters = decode.Counters((0,) * decode.CNT_MAX)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wants_logs = consumer_wants(consumer, "logs")
        self._wants_metrics = consumer_wants(consumer, "metrics")

    # -- lifecycle ----------------------------------------------------------------------------

    def prepare(self) -> tuple[str, list[str]] | None:
        """The program text and compiler flags for this kernel (None when drops and TCP are both
        disabled); a :class:`StartError` if the kernel lacks what they need."""
        if not self.config.enabled:
            return None
        try:
            facts = program.read_kernel_facts(self.config)
        except (tracefs.TracefsError, btf_mod.BtfError) as exc:
            raise StartError(self._id, f"kernel events: {exc}", _REMEDY_KERNEL) from None
        self._names = decode.Names(facts.drop_reasons, facts.tcp_states, facts.reset_reasons)
        self._programs = program.programs_for(self.config)
        return program.build(facts, self.config, events=self._wants_logs)

    def start(self, bpf: Any = None) -> None:
        """Attach the programs, then start the thread; a :class:`StartError` if the kernel cannot
        do it. ``bpf``: the module :meth:`prepare`'s source was compiled into (None: compile one
        of its own). With drops and TCP both disabled, does nothing."""
        if not self.config.enabled:
            return
        if bpf is None:
            built = self.prepare()
            assert built is not None and self._programs is not None
            try:
                bpf = program.load_and_attach(*built, self._programs)
            except Exception as exc:
                raise StartError(self._id, f"cannot compile or attach the kernel-event programs: {exc}",
                                 _REMEDY_KERNEL) from None
            self._owns_bpf = True
        else:
            if self._programs is None:
                raise RuntimeError("KernelEvents.prepare() must give the source before start(bpf)")
            try:
                program.attach(bpf, self._programs)
            except Exception as exc:
                raise StartError(self._id, f"cannot attach the kernel-event programs: {exc}", _REMEDY_KERNEL) from None
        self._bpf = bpf
        try:
            self._open_readers()
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._run, name="flowtel-kernel-events", daemon=True)
        self._thread.start()
        log.info("kernel events attached: %s", ", ".join(f"{c}:{e}" for c, e in self._programs.values()))

    def _open_readers(self) -> None:
        tcp, drops = self.config.tcp, self.config.drops
        samples = program.drop_samples(self.config, events=self._wants_logs)
        if self._wants_logs and tcp.enabled and tcp.connection_events:
            self._conns = DoubleBuffer(self._bpf, "conn_flows", "conn_active", decode.RawConn,
                                       decode.RawConn.__slots__, self._counter, decode.CNT_CONN_FLOWS_CREATED)
            self._conn_decoder = decode.ConnDecoder(self._names, self._node)
            self._conn_early = EarlyDrain(self._conns, self.config.drain_at_fill, self.config.max_early_drains)
            # flowtel_component_tcp_closes_unseen: closes counted late, as of the last collection.
            self._telemetry.register_gauge(self._id, "tcp_closes_unseen",
                                           functools.partial(self._last_count, decode.CNT_CONN_CLOSE_UNSEEN))
        if (self._wants_logs and drops.enabled and drops.events) or samples:
            self._drop_decoder = decode.DropDecoder(self._names, self._node,
                                                    host_netns=os.stat("/proc/self/ns/net").st_ino,
                                                    ifname=_host_ifname, symbol=_kernel_symbol)
        if (self._wants_logs and tcp.enabled and tcp.events) or samples:
            self._decoder = decode.EventDecoder(self._bpf["kernel_event_layout"].Leaf, self._names, self._node,
                                                self._drop_decoder if samples else None)
            self._ring = RingReader(self._bpf["kernel_events"].map_fd, self._pending.append)
        if self._wants_logs and drops.enabled and drops.events:
            self._drops = DoubleBuffer(self._bpf, "drop_flows", "drop_active", decode.RawDrop,
                                       decode.RawDrop.__slots__,
                                       self._counter, decode.CNT_DROP_FLOWS_CREATED,
                                       cache=dropcache.drop_cache(self._bpf))
            self._drop_early = EarlyDrain(self._drops, self.config.drain_at_fill, self.config.max_early_drains)
        if samples:
            # Self-telemetry (flowtel_component_drop_samples{,_suppressed}), as of the last collection.
            for name, index in (("drop_samples", decode.CNT_DROP_SAMPLES),
                                ("drop_samples_suppressed", decode.CNT_DROP_SAMPLES_SUPPRESSED)):
                self._telemetry.register_gauge(self._id, name, functools.partial(self._last_count, index))

    def _last_count(self, index: int) -> float:
        return float(self._last_counters[index])

    def stop(self) -> None:
        """Detach, then report what is still buffered and the final counters."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._bpf is None:
            return
        try:
            for category, event in (self._programs or {}).values():
                try:
                    self._bpf.detach_tracepoint(f"{category}:{event}")
                except Exception:
                    pass  # not attached (a failed start)
            if self._ring is not None:
                self._ring.consume()
                self._emit(self._take_records())
            self._collect(writers_stopped=True)
        finally:
            if self._ring is not None:
                self._ring.close()
                self._ring = None
            if self._owns_bpf:
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
            if program.drop_samples(self.config, events=self._wants_logs):
                points += decode.drop_sample_points(counters, now)
        if self.config.tcp.enabled:
            points += decode.tcp_points(self._tcp_states(), counters, self._names, now)
        return points

    def tcp_connections(self) -> list[decode.TcpConnection]:
        """Sockets the kernel tracks now (those the tcp_state gauge counts)."""
        if self._bpf is None or not self.config.tcp.enabled:
            return []
        sets, tuples = self._bpf["tcp_conns"], self._bpf["tcp_conn_tuples"]
        n = sets.max_entries
        keys, values = (sets.Key * n)(), (sets.Leaf * n)()
        got = read_batch(sets.get_fd(), keys, ctypes.sizeof(sets.Key), values, ctypes.sizeof(sets.Leaf), n,
                         delete=False, name="tcp_conns")
        m = tuples.max_entries
        tkeys, ends = (tuples.Key * m)(), (tuples.Leaf * m)()
        read_batch(tuples.get_fd(), tkeys, ctypes.sizeof(tuples.Key), ends, ctypes.sizeof(tuples.Leaf), m,
                   delete=False, name="tcp_conn_tuples")
        # Each value is a set of ways (struct tcp_conn_set), in index order from 0 (one batch of
        # an array); sk 0: a free way. Its ends are at set * ways + way of tcp_conn_tuples, read a
        # moment later: a socket that changed state meanwhile may show its new ends (inspection).
        ways = len(values[0].sk) if got else 0
        return [decode.connection(self._names, v, w, ends[i * ways + w])
                for i, v in enumerate(values[:got]) for w in range(ways) if v.sk[w]]

    # -- the thread's work -----------------------------------------------------------------------

    def _poll(self, timeout: float) -> list[Flow]:
        """Wait up to ``timeout`` seconds for TCP events; the records of those that arrived."""
        if self._ring is None:
            self._stop.wait(timeout)
            return []
        self._ring.poll(max(0, int(timeout * 1000)))
        # The kernel does not announce every event (see submit() in kernel_events.c): a poll
        # that timed out leaves those in the buffer, so take them explicitly.
        self._ring.consume()
        return self._take_records()

    def _take_records(self) -> list[Flow]:
        if not self._pending or self._decoder is None:
            return []
        pending = self._pending[:]
        del self._pending[:]  # the reader's callback appends to this very list
        size = self._decoder.size
        good = [p for p in pending if len(p) == size]
        if len(good) != len(pending):
            self._telemetry.add(self._id, "kernel_events_malformed", len(pending) - len(good))
        offset = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        return self._decoder.decode(b"".join(good), offset)

    def _run(self) -> None:
        interval = self.config.collection_interval
        next_at = time.monotonic() + interval
        early = [e for e in (self._drop_early, self._conn_early) if e is not None]
        # With an early drain the maps' fill is read every FILL_POLL_S (one per-CPU counter read
        # each), so the ring is polled at least that often too (events then arrive sooner).
        poll = min(self.config.poll_interval, FILL_POLL_S) if any(e.enabled for e in early) else self.config.poll_interval
        while not self._stop.is_set():
            try:
                self._emit(self._poll(min(poll, max(0.0, next_at - time.monotonic()))))
                if time.monotonic() >= next_at:
                    next_at += interval
                    for e in early:
                        e.new_interval()
                    self._collect()
                    continue
                # Before the interval ends: a map past drain_at_fill is drained alone (the
                # counters and metric points keep the interval's times).
                if self._drop_early is not None and self._drop_early.due():
                    self._telemetry.add(self._id, "early_drains")
                    self._drain_drops()
                if self._conn_early is not None and self._conn_early.due():
                    self._telemetry.add(self._id, "early_drains")
                    self._drain_conns()
            except Exception:  # one bad read must not end the source for the agent's life
                self._telemetry.add(self._id, "kernel_events_errors")
                log.exception("reading kernel events failed")
                self._stop.wait(1.0)

    def _drain(self, buffer: DoubleBuffer[T], decoder: Callable[[list[T], int], list[Flow]],
               early: EarlyDrain | None, writers_stopped: bool, lost_source: str, remedy: str) -> None:
        """Hand on one double buffer's flows (:class:`flowtel.lib.bpf.earlydrain.Drain`): a chunk
        at a time, each once the previous one went through the pipeline (as the ebpf receiver's
        flow drain), so a flood of distinct drops or a connection-rate workload holds two chunks
        in memory, not an interval; the map's fill is read during the waits and it is taken
        again when due. A drain of one chunk (the usual case) never waits, so the ring reads on
        this thread go on. Then what the LRU evicted before the takes, as ``lost_source``
        (reported even if the hand-on raised)."""
        offset = time.time_ns() - time.monotonic_ns()
        drain: Drain[T, Flow] = Drain(buffer, self.config.collection_interval, lambda raws: decoder(raws, offset),
                                      self._emit, self._wait_consumed, early=early,
                                      on_early=lambda: self._telemetry.add(self._id, "early_drains"),
                                      chunk=DRAIN_CHUNK_RECORDS)
        try:
            drain.run(writers_stopped=writers_stopped)
        finally:
            if drain.waits_timed_out:
                self._telemetry.add(self._id, "drain_waits_timed_out", drain.waits_timed_out)
            if drain.abandoned:
                # Taken out of the kernel and never handed on (the hand-on raised): not silent.
                self._telemetry.add(self._id, "kernel_events_lost", drain.abandoned)
            if drain.evicted:
                self._telemetry.add(self._id, "kernel_events_lost", drain.evicted)
                log.warning("%s: %d flows evicted before the drain (raise %s)", lost_source, drain.evicted, remedy)
                self._emit([LostEvents(time.time_ns(), lost_source, drain.evicted, self._node)])

    def _wait_consumed(self, timeout: float) -> bool:
        # Once stop() began, the rest goes on at once: stop() waits for this thread before its
        # final collection and must not give up on it (see the ebpf receiver's drain).
        return self._stop.is_set() or wait_consumed(self._consumer, timeout)

    def _drain_drops(self, *, writers_stopped: bool = False) -> None:
        if self._drops is not None and self._drop_decoder is not None:
            self._drain(self._drops, self._drop_decoder.decode, self._drop_early, writers_stopped,
                        decode.LOST_DROP_FLOW_MAP_FULL, "kernel_events.drops.max_flows")

    def _drain_conns(self, *, writers_stopped: bool = False) -> None:
        if self._conns is not None and self._conn_decoder is not None:
            self._drain(self._conns, self._conn_decoder.decode, self._conn_early, writers_stopped,
                        decode.LOST_CONN_FLOW_MAP_FULL, "kernel_events.tcp.max_connection_flows")

    def _collect(self, *, writers_stopped: bool = False) -> None:
        """Drain the drop and connection flows, report new losses, and emit the metric points."""
        now = time.time_ns()
        self._drain_drops(writers_stopped=writers_stopped)
        self._drain_conns(writers_stopped=writers_stopped)
        records: list[Record] = []
        counters = self._last_counters = self._counters()
        # Runs the kernel skipped (another tracing program was running on that CPU): their
        # events are in no counter and no map, so this is the only place they are counted.
        misses = self._program_misses()
        if misses > self._misses_seen:
            lost = misses - self._misses_seen
            self._misses_seen = misses
            self._telemetry.add(self._id, "kernel_events_lost", lost)
            records.append(LostEvents(now, decode.LOST_PROGRAM_MISSED, lost, self._node))
            log.warning("kernel events: %d tracepoint runs skipped by the kernel (another tracing "
                        "program was running on the CPU)", lost)
        for source, count in decode.lost_deltas(counters, self._lost_seen):
            self._telemetry.add(self._id, "kernel_events_lost", count)
            records.append(LostEvents(now, source, count, self._node))
            log.warning("kernel events: %d lost (%s)", count, source)
        self._emit(records)
        if self._wants_metrics:
            points: list[Record] = list(self.metrics())
            if points:
                self._consumer.consume(points)

    def program_misses(self) -> int:
        """Runs of this source's programs the kernel skipped since they were loaded (each a
        drop or TCP transition not seen), summed over the programs."""
        return self._program_misses() if self._bpf is not None else self._misses_seen

    def _program_misses(self) -> int:
        funcs = getattr(self._bpf, "funcs", {})
        return sum(proginfo.recursion_misses(funcs[fn].fd) for fn in (self._programs or {}) if fn in funcs)

    def counters(self) -> decode.Counters:
        """The kernel's cumulative counters (``decode.CNT_*``): now, or after :meth:`stop` as the
        final collection read them."""
        if self._bpf is None:
            return self._last_counters
        return self._counters()

    def _counter(self, index: int) -> int:
        return int(self._bpf["kev_counters"].sum(ctypes.c_int(index)).value)

    def _emit(self, records: Sequence[Record]) -> None:
        if records and self._wants_logs:
            self._telemetry.add(self._id, "records_out", len(records))
            self._consumer.consume(list(records))

    def _counters(self) -> decode.Counters:
        table = self._bpf["kev_counters"]
        return decode.Counters(tuple(int(table.sum(ctypes.c_int(i)).value) for i in range(decode.CNT_MAX)))

    def _drop_stats(self) -> dict[tuple[int, int], tuple[int, int]]:
        out: dict[tuple[int, int], tuple[int, int]] = {}
        # The kernel's own reasons by index (reason * 2 + direction), the rest by key.
        for index, per_cpu in self._bpf["drop_reasons"].items():
            packets = sum(v.packets for v in per_cpu)
            if packets:
                out[(index.value // 2, index.value % 2)] = (packets, sum(v.bytes for v in per_cpu))
        for key, per_cpu in self._bpf["drop_stats"].items():
            out[(key.reason, key.direction)] = (sum(v.packets for v in per_cpu), sum(v.bytes for v in per_cpu))
        return out

    def _tcp_states(self) -> dict[int, int]:
        table = self._bpf["tcp_states"]
        return {i: int(table.sum(ctypes.c_int(i)).value) for i in range(len(table))}
