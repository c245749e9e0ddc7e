"""The DNS reader: samples from the ``dns_events`` and ``dns_names`` ring buffers, and the
kernel's DNS maps every interval (bpf/dns.h).

One thread polls the ring buffer (``ring_buffer_poll``); the callback only copies each
record's bytes, and the batch is decoded, parsed and turned into flows after the poll
returns. The record layout is bcc's ctypes class of ``struct dns_event`` (the leaf type of
the ``dns_scratch`` map), so there is no hand-kept copy of it here.

Every interval the same thread flips the kernel's aggregation buffer, reads the ring to its
end (so every sample of the old buffer has been seen), drains the old buffer and reports
what was not sampled as aggregated flows, removes the requests that timed out in the
kernel's pending map (unanswered flows), and emits what it counted: loss (``LostEvents``)
to the logs pipelines, and the DNS counters and latency histogram as metric points to the
metrics pipelines, if any.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import operator
import os
import re
import secrets
import threading
import time
from typing import Any, Callable

import bpf as bpf_sources
from flowtel.component import Consumer, CreateSettings, consumer_wants
from flowtel.records import LostEvents, Record
from flowtel.histogram import DNS_LATENCY_BOUNDS
from receiver.ebpf.config import DnsConfig
from receiver.ebpf.dns import DnsEvent, DnsTracker
from flowtel.lib.bpf.layout import struct_for
from receiver.ebpf.dnsmaps import DnsMaps

log = logging.getLogger("flowtel.receiver.ebpf.dns")

# TCP messages whose header and question were not in the segment that starts them (or came
# after another message in one segment): the kernel could not count them.
LOST_DNS_TCP_UNPARSED = "DNS_TCP_UNPARSED"
LOST_DNS_PENDING_TABLE_FULL = "DNS_PENDING_TABLE_FULL"  # requests not matched (counted all the same)
LOST_DNS_AGGREGATE_MAP_FULL = "DNS_AGGREGATE_MAP_FULL"  # messages in node totals only, in no flow
# bpf/flowtel.h FLOWTEL_DNS_CNT_* names, read by header_define
_KERNEL_COUNTERS = ("SAMPLES", "SAMPLES_LOST", "SAMPLES_SKIPPED", "UNKEYED_REQUESTS", "UNKEYED_RESPONSES",
                    "UNKEYED_MALFORMED", "RETRANSMITS", "PENDING_FULL", "UNMATCHED", "TCP_UNPARSED",
                    "TCP_CONTINUATIONS", "SEEN_BEFORE", "NOT_HERE")
POLL_TIMEOUT_MS = 100
WARN_EVERY_S = 60.0


def header_define(name: str) -> int:
    """The value of ``#define name N`` in bpf/flowtel.h (so indexes are not copied here)."""
    m = re.search(rf"^#define\s+{re.escape(name)}\s+(\d+)\b", bpf_sources.source("flowtel.h"), re.M)
    if m is None:
        raise RuntimeError(f"bpf/flowtel.h defines no {name}")
    return int(m.group(1))


def latency_bucket_expr(bounds_s: tuple[float, ...]) -> str:
    """A C expression of ``ns`` giving its bucket for ``bounds_s`` (upper bounds inclusive)."""
    if len(bounds_s) + 1 > header_define("FLOWTEL_DNS_LAT_MAX_BUCKETS"):
        raise ValueError("too many DNS latency buckets for struct dns_latency")
    expr = str(len(bounds_s))
    for i in reversed(range(len(bounds_s))):
        expr = f"((ns)<={round(bounds_s[i] * 1e9)}ULL?{i}:{expr})"
    return expr


def pending_sets(max_pending: int) -> int:
    """Sets of dns_pending (bpf/dns.h): a power of two, with room for ``max_pending`` requests."""
    ways = header_define("FLOWTEL_DNS_PENDING_WAYS")
    sets = 1
    while sets * ways < max_pending:
        sets *= 2
    return sets


def agg_sets(max_aggregates: int) -> int:
    """Sets of dns_agg_ways_<slot> (bpf/flowtel.h): a power of two with twice ``max_aggregates``
    way words, so that a set is seldom full before the entries are."""
    ways = header_define("FLOWTEL_DNS_AGG_WAYS")
    sets = 1
    while sets * ways < 2 * max_aggregates:
        sets *= 2
    return sets


def cflags(config: DnsConfig) -> dict[str, int | str]:
    """The compile-time constants bpf/dns.h needs."""
    page = os.sysconf("SC_PAGE_SIZE")
    return {
        "FLOWTEL_DNS": 1,
        "FLOWTEL_IS_DNS_PORT(p)": "(" + "||".join(f"((p)=={int(p)})" for p in config.ports) + ")",
        "FLOWTEL_DNS_CAPTURE": config.capture_bytes,
        # Two rings of half the size each: dns_events (per-message samples) and dns_names.
        "FLOWTEL_DNS_RING_PAGES": max(1, config.ring_buffer_kb * 1024 // 2 // page),
        "FLOWTEL_DNS_MAX_AGGREGATES": config.max_aggregates,
        "FLOWTEL_DNS_AGG_SETS": agg_sets(config.max_aggregates),
        "FLOWTEL_DNS_PENDING_SETS": pending_sets(config.max_pending),
        # The set-index hashes' seed, new at every load (bpf/dns.h: what a pod cannot predict,
        # it cannot aim at another pod's set).
        "FLOWTEL_DNS_SET_SEED": f"{secrets.randbits(64)}ULL",
        "FLOWTEL_DNS_TIMEOUT_NS": f"{int(config.timeout * 1e9)}ULL",
        "FLOWTEL_DNS_SAMPLE_COST_NS": f"{1_000_000_000 // config.sample_rate}ULL",
        "FLOWTEL_DNS_LAT_BUCKET(ns)": latency_bucket_expr(DNS_LATENCY_BOUNDS),
    }


def install_program(bpf: Any) -> None:
    """Load flowtel_dns and put it where the tc programs tail-call it (bpf/dns.h): until then
    DNS packets are only counted as not observed."""
    from bcc import BPF
    fn = bpf.load_func("flowtel_dns", BPF.SCHED_CLS)
    bpf["dns_tail"][ctypes.c_int(0)] = ctypes.c_int(fn.fd)


class _Decoder:
    """``struct dns_event`` records → :class:`DnsEvent`, by the layout bcc derived from C."""

    def __init__(self, event_type: type[ctypes.Structure]) -> None:
        hdr_type: Any = {f[0]: f[1] for f in event_type._fields_}["hdr"]
        self._hdr, names = struct_for(hdr_type)
        self.payload_offset = event_type.payload.offset
        if self._hdr.size != self.payload_offset:
            raise RuntimeError("struct dns_event: payload does not follow the header directly")
        index = {n: i for i, n in enumerate(names)}
        wanted = [f for f in DnsEvent.__slots__ if f not in ("payload", "__weakref__")]
        missing = [f for f in wanted if f not in index]
        if missing:
            raise RuntimeError(f"bpf/flowtel.h struct dns_event_hdr lacks {missing}")
        # DnsEvent's fields in its order, before and after payload, picked in C and passed by
        # position (keywords built per record cost ~5 µs of the reader's time, measured).
        split = wanted.index("kind")
        self._before: Callable[[tuple[Any, ...]], tuple[Any, ...]] = operator.itemgetter(
            *(index[f] for f in wanted[:split]))
        self._after: Callable[[tuple[Any, ...]], tuple[Any, ...]] = operator.itemgetter(
            *(index[f] for f in wanted[split:]))
        if [f for f in DnsEvent.__slots__ if f != "__weakref__"] != wanted[:split] + ["payload"] + wanted[split:]:
            raise RuntimeError("DnsEvent's fields are not in the order the decoder passes them")
        self._cap_len = index["cap_len"]

    def decode(self, record: bytes) -> DnsEvent:
        values = self._hdr.unpack_from(record)
        start = self.payload_offset
        payload = record[start : start + values[self._cap_len]]
        return DnsEvent(*(self._before(values) + (payload,) + self._after(values)))


class DnsRing:
    """The reader thread of one loaded ``tc_flow.c`` with DNS compiled in."""

    def __init__(
        self,
        bpf: Any,
        tracker: DnsTracker,
        settings: CreateSettings,
        next_consumer: Consumer,
        *,
        report_interval: float,
    ) -> None:
        self._bpf = bpf
        self.tracker = tracker
        self._settings = settings
        self._next = next_consumer
        self._report_interval = report_interval
        leaf = bpf["dns_scratch"].Leaf
        # A per-CPU map's Leaf is an array of the C type, one per CPU.
        self._decoder = _Decoder(leaf._type_ if issubclass(leaf, ctypes.Array) else leaf)
        self.maps = DnsMaps(bpf, {n: header_define(f"FLOWTEL_DNS_CNT_{n}") for n in _KERNEL_COUNTERS},
                            header_define("FLOWTEL_DNS_SWEEP_SETS"))
        self._raw: list[bytes] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Kernel counters as of the last report (telemetry may be read after the maps are gone).
        self._kernel: dict[str, int] = dict.fromkeys(_KERNEL_COUNTERS, 0)
        self._last_warning: dict[str, float] = {}
        self._warned_total: dict[str, int] = {}
        self._wants_logs = consumer_wants(next_consumer, "logs")
        self._wants_metrics = consumer_wants(next_consumer, "metrics")
        bpf["dns_events"].open_ring_buffer(self._on_record)
        bpf["dns_names"].open_ring_buffer(self._on_record)
        telemetry, cid = settings.telemetry, settings.id
        for field in dataclasses.fields(tracker.counts):
            telemetry.register_gauge(cid, f"dns_{field.name}", functools.partial(getattr, tracker.counts, field.name))
        for name in _KERNEL_COUNTERS:
            telemetry.register_gauge(cid, f"dns_kernel_{name.lower()}", functools.partial(self._kernel.__getitem__, name))

    def _on_record(self, _ctx: Any, data: int, size: int) -> int:
        # Runs inside ring_buffer_poll for every record: copy and return, nothing else.
        self._raw.append(ctypes.string_at(data, size))
        return 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flowtel-ebpf-dns", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_report = time.monotonic() + self._report_interval
        while not self._stop.is_set():
            try:
                self._bpf.ring_buffer_poll(POLL_TIMEOUT_MS)
                # Samples are written without a wakeup (bpf/dns.h): read what is there.
                self._bpf.ring_buffer_consume()
                self._handle()
                if time.monotonic() >= next_report:
                    next_report += self._report_interval
                    self._interval(writers_stopped=False)
            except Exception:
                # A bug must not end DNS observation for the agent's life; it is counted and
                # logged, at most once a minute.
                self._settings.telemetry.add(self._settings.id, "dns_errors")
                now = time.monotonic()
                if now - self._last_warning.get("error", -WARN_EVERY_S) >= WARN_EVERY_S:
                    self._last_warning["error"] = now
                    log.exception("DNS reader failed on a batch (counted in dns_errors)")

    @property
    def alive(self) -> bool:
        """Whether the reader thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop the thread (the ring is not read again until :meth:`final_drain`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            if self._thread.is_alive():
                log.error("DNS reader thread did not stop within 10s")

    def final_drain(self) -> None:
        """After the programs are detached: read what is left, drain both buffers, report.

        Requests still waiting have not timed out, so they are not reported as unanswered.
        """
        self._interval(writers_stopped=True)

    def _handle(self) -> None:
        raw, self._raw = self._raw, []
        decode = self._decoder.decode
        self._emit(list(self.tracker.process([decode(r) for r in raw])))

    def _emit(self, records: list[Record]) -> None:
        if records and self._wants_logs:
            self._settings.telemetry.add(self._settings.id, "records_out", len(records))
            self._next.consume(records)

    def _interval(self, *, writers_stopped: bool) -> None:
        """Drain the kernel's aggregates without losing a message, expire, and report."""
        maps = self.maps
        if writers_stopped:
            slots = [1 - maps.active, maps.active]
        else:
            slots = [maps.flip()]  # waits for programs that chose the old buffer
        # Every sample counted in the old buffer is in the ring now: read them all first.
        self._bpf.ring_buffer_consume()
        self._handle()
        records: list[Record] = []
        for slot in slots:
            records.extend(self.tracker.reconcile(slot, maps.drain(slot)))
        if not writers_stopped:
            # A request is unanswered once the timeout has passed; the kernel matches only
            # responses younger than it, so nothing it could still match is removed here.
            deadline = time.monotonic_ns() - self.tracker.timeout_ns
            records.extend(self.tracker.kernel_unanswered(maps.expire(deadline)))
        self._emit(records)
        self._report()

    def kernel_counts(self) -> dict[str, int]:
        """The kernel's cumulative DNS counters (FLOWTEL_DNS_CNT_*, by name without the prefix)."""
        return {name: self.maps.counter(name) for name in _KERNEL_COUNTERS}

    def _report(self) -> None:
        now = time.time_ns()
        node = self._settings.node_name
        counts = self.tracker.counts
        lost_records: list[Record] = []
        kernel = self.kernel_counts()
        prev = dict(self._kernel)
        self._kernel.update(kernel)
        delta = {k: kernel[k] - prev.get(k, 0) for k in kernel}
        self.tracker.count_unkeyed(delta["UNKEYED_REQUESTS"], delta["UNKEYED_RESPONSES"], delta["UNKEYED_MALFORMED"])
        if delta["TCP_UNPARSED"] > 0:
            lost_records.append(LostEvents(now, LOST_DNS_TCP_UNPARSED, delta["TCP_UNPARSED"], node))
        unkeyed = delta["UNKEYED_REQUESTS"] + delta["UNKEYED_RESPONSES"] + delta["UNKEYED_MALFORMED"]
        if unkeyed > 0:
            lost_records.append(LostEvents(now, LOST_DNS_AGGREGATE_MAP_FULL, unkeyed, node))
        if delta["PENDING_FULL"] > 0:
            lost_records.append(LostEvents(now, LOST_DNS_PENDING_TABLE_FULL, delta["PENDING_FULL"], node))
        self._warn("tcp", kernel["TCP_UNPARSED"], "%d DNS messages over TCP not counted since the last warning: "
                   "their header and question were not in the segment that starts them, or another message "
                   "preceded them in one segment")
        self._warn("unkeyed", kernel["UNKEYED_REQUESTS"] + kernel["UNKEYED_RESPONSES"] + kernel["UNKEYED_MALFORMED"],
                   "DNS aggregation map full: %d DNS messages counted in node totals only since the last warning "
                   "(raise dns.max_aggregates)")
        self._warn("pending", kernel["PENDING_FULL"], "DNS pending table full: %d requests "
                   "not matched since the last warning (raise dns.max_pending)")
        self._warn("parse", counts.parse_errors, "%d packets on DNS ports held no readable DNS message "
                   "since the last warning (last: %s)", self.tracker.last_parse_error)
        if lost_records and self._wants_logs:
            self._next.consume(lost_records)
        if self._wants_metrics:
            self._next.consume(list(self.tracker.metric_points(now, self.maps.latency())))

    def _warn(self, kind: str, total: int, msg: str, *args: object) -> None:
        # Rate-limited per kind: a flood of bad packets must not become a flood of log lines.
        new = total - self._warned_total.get(kind, 0)
        now = time.monotonic()
        if new > 0 and now - self._last_warning.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._last_warning[kind] = now
            self._warned_total[kind] = total
            log.warning(msg, new, *args)
