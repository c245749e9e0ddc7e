"""Reading DNS packets from the kernel's ``dns_events`` ring buffer (bpf/tc_flow.c).

One thread polls the ring buffer (``ring_buffer_poll``); the callback only copies each
record's bytes, and the batch is decoded, parsed and matched after the poll returns, so
the kernel's buffer is emptied as fast as Python can. The record layout is bcc's ctypes
class of ``struct dns_event`` (the leaf type of the ``dns_scratch`` map), so there is no
hand-kept copy of it here.

Every interval the reader emits what it counted: loss (``LostEvents``: ring buffer full in
the kernel, pending table full in user space) to the logs pipelines, and the DNS counters
as metric points to the metrics pipelines, if any.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import re
import threading
import time
from typing import Any

import bpf as bpf_sources
from flowtel.component import Consumer, CreateSettings, consumer_wants
from flowtel.records import LostEvents, Record
from receiver.ebpf.dns import DnsEvent, DnsTracker
from receiver.ebpf.layout import struct_for

log = logging.getLogger("flowtel.receiver.ebpf.dns")

LOST_DNS_RING_BUFFER_FULL = "DNS_RING_BUFFER_FULL"
LOST_DNS_PENDING_TABLE_FULL = "DNS_PENDING_TABLE_FULL"
POLL_TIMEOUT_MS = 100
# A packet's timestamp is taken a few microseconds before its record is committed to the
# ring; requests are expired only this long after the last poll began, so a response that
# was on its way cannot be missed.
COMMIT_SLACK_NS = 20_000_000
WARN_EVERY_S = 60.0


def header_define(name: str) -> int:
    """The value of ``#define name N`` in bpf/flowtel.h (so indexes are not copied here)."""
    m = re.search(rf"^#define\s+{re.escape(name)}\s+(\d+)\b", bpf_sources.source("flowtel.h"), re.M)
    if m is None:
        raise RuntimeError(f"bpf/flowtel.h defines no {name}")
    return int(m.group(1))


def cflags(ports: list[int], capture_bytes: int, ring_bytes: int) -> dict[str, int | str]:
    """The compile-time constants tc_flow.c needs for DNS capture."""
    page = os.sysconf("SC_PAGE_SIZE")
    return {
        "FLOWTEL_DNS": 1,
        "FLOWTEL_IS_DNS_PORT(p)": "(" + "||".join(f"((p)=={int(p)})" for p in ports) + ")",
        "FLOWTEL_DNS_CAPTURE": capture_bytes,
        "FLOWTEL_DNS_RING_PAGES": max(1, ring_bytes // page),
    }


class _Decoder:
    """``struct dns_event`` records → :class:`DnsEvent`, by the layout bcc derived from C."""

    def __init__(self, event_type: type[ctypes.Structure]) -> None:
        hdr_type = {f[0]: f[1] for f in event_type._fields_}["hdr"]
        if not issubclass(hdr_type, ctypes.Structure):
            raise RuntimeError("struct dns_event: hdr is not a struct (bpf/flowtel.h)")
        self._hdr, names = struct_for(hdr_type)
        self.payload_offset = event_type.payload.offset
        if self._hdr.size != self.payload_offset:
            raise RuntimeError("struct dns_event: payload does not follow the header directly")
        index = {n: i for i, n in enumerate(names)}
        wanted = [f for f in DnsEvent.__slots__ if f != "payload"]
        missing = [f for f in wanted if f not in index]
        if missing:
            raise RuntimeError(f"bpf/flowtel.h struct dns_event_hdr lacks {missing}")
        self._order = [index[f] for f in wanted]
        self._cap_len = index["cap_len"]

    def decode(self, record: bytes) -> DnsEvent:
        values = self._hdr.unpack_from(record)
        start = self.payload_offset
        payload = record[start : start + values[self._cap_len]]
        return DnsEvent(*[values[i] for i in self._order], payload)  # type: ignore[call-arg]  # the fields are checked against DnsEvent.__slots__ in __init__


class DnsRing:
    """The reader thread of one loaded ``tc_flow.c`` with DNS capture compiled in."""

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
        self._counters = bpf["counters"]
        self._cnt_lost = header_define("FLOWTEL_CNT_DNS_LOST")
        self._cnt_events = header_define("FLOWTEL_CNT_DNS_EVENTS")
        self._raw: list[bytes] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost_reported = 0
        self._pending_full_reported = 0
        self._last_warning: dict[str, float] = {}
        self._warned_total: dict[str, int] = {}
        self._wants_logs = consumer_wants(next_consumer, "logs")
        self._wants_metrics = consumer_wants(next_consumer, "metrics")
        bpf["dns_events"].open_ring_buffer(self._on_record)
        telemetry, cid = settings.telemetry, settings.id
        for field in dataclasses.fields(tracker.counts):
            telemetry.register_gauge(cid, f"dns_{field.name}", functools.partial(getattr, tracker.counts, field.name))
        telemetry.register_gauge(cid, "dns_pending", lambda: len(tracker.pending))
        # As of the last report: telemetry may be read after the maps are gone.
        telemetry.register_gauge(cid, "dns_ring_lost", lambda: self._lost_reported)

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
                horizon = time.monotonic_ns() - COMMIT_SLACK_NS
                self._bpf.ring_buffer_poll(POLL_TIMEOUT_MS)
                self._handle(horizon)
                if time.monotonic() >= next_report:
                    next_report += self._report_interval
                    self._report()
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
        """After the programs are detached: read what is left, report, forget pending requests.

        Requests still waiting have not timed out, so they are not reported as unanswered.
        """
        self._bpf.ring_buffer_consume()
        self._handle(None)
        left = self.tracker.pending.clear()
        if left:
            log.info("DNS: %d requests still waiting for a response at shutdown were not reported", left)
        self._report()

    def _handle(self, horizon: int | None) -> None:
        raw, self._raw = self._raw, []
        decode = self._decoder.decode
        records: list[Record] = list(self.tracker.process([decode(r) for r in raw]))
        if horizon is not None:
            records.extend(self.tracker.expire(horizon))
        if records and self._wants_logs:
            self._settings.telemetry.add(self._settings.id, "records_out", len(records))
            self._next.consume(records)

    def kernel_counts(self) -> tuple[int, int]:
        """(records written to the ring, records lost to a full ring), cumulative, from the kernel."""
        return self._counter(self._cnt_events), self._counter(self._cnt_lost)

    def _counter(self, index: int) -> int:
        return int(self._counters.sum(ctypes.c_int(index)).value)

    def _report(self) -> None:
        now = time.time_ns()
        node = self._settings.node_name
        counts = self.tracker.counts
        lost_records: list[Record] = []

        lost = self._counter(self._cnt_lost)
        if lost > self._lost_reported:
            lost_records.append(LostEvents(now, LOST_DNS_RING_BUFFER_FULL, lost - self._lost_reported, node))
            self._lost_reported = lost
        if counts.pending_full > self._pending_full_reported:
            new_full = counts.pending_full - self._pending_full_reported
            lost_records.append(LostEvents(now, LOST_DNS_PENDING_TABLE_FULL, new_full, node))
            self._pending_full_reported = counts.pending_full
        self._warn("ring", lost, "DNS ring buffer full: %d DNS packets lost since the last warning "
                   "(raise dns.ring_buffer_kb)")
        self._warn("pending", counts.pending_full, "DNS pending table full: %d requests not matched "
                   "since the last warning (raise dns.max_pending)")
        self._warn("parse", counts.parse_errors, "%d packets on DNS ports held no readable DNS message "
                   "since the last warning (last: %s)", self.tracker.last_parse_error)
        if lost_records and self._wants_logs:
            self._next.consume(lost_records)
        if self._wants_metrics:
            self._next.consume(list(self.tracker.metric_points(now)))

    def _warn(self, kind: str, total: int, msg: str, *args: object) -> None:
        # Rate-limited per kind: a flood of bad packets must not become a flood of log lines.
        new = total - self._warned_total.get(kind, 0)
        now = time.monotonic()
        if new > 0 and now - self._last_warning.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._last_warning[kind] = now
            self._warned_total[kind] = total
            log.warning(msg, new, *args)
