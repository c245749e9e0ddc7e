"""The ``fqdnpolicy`` receiver: packets the FQDN egress datapath denied, as Hubble drop flows.

Every ``collection_interval`` it opens the dnsproxy's pinned maps by path, reads the kernel's
cumulative denied-packet counts (flowtel/lib/bpf/denied.py) and emits, per entry that
counted packets since the previous read, one Flow: verdict DROPPED (AUDIT in audit mode),
drop_reason POLICY_DENIED, traffic_direction EGRESS, the pod's veth, packet and byte counts.
Entries the kernel's LRU evicted before a read are reported as lost events.

The proxy is a separate DaemonSet: this receiver never fails the agent because the maps are
missing. It waits (status OK: a node without the proxy is not an error), follows the pins as
they appear, disappear or are replaced by new maps, and reports a recoverable error only
when pinned maps exist but cannot be read.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from flowtel.component import Consumer, CreateSettings, Receiver, Status
from flowtel.errors import StartError
from flowtel.records import EventKind, Flow, LostEvents, Record, TrafficDirection, Verdict
from receiver.fqdnpolicy import pinned
from receiver.fqdnpolicy.config import FqdnPolicyReceiverConfig
from flowtel.lib.bpf.denied import (CNT_DENIED_CREATED, CNT_EVENTS_LOST, DROP_REASON, MAP_COUNTERS, MAP_DENIED,
                                        MAP_DENIED_CREATED, VERDICT_AUDIT, DeniedDelta, DeniedDiff, DeniedLayout,
                                        DeniedMapReader, cpu_count_possible, header_layout)

log = logging.getLogger("flowtel.receiver.fqdnpolicy")

LOST_DENIED_MAP_FULL = "FQDN_DENIED_MAP_FULL"
LOST_DENIED_UPDATE_FAILED = "FQDN_DENIED_UPDATE_FAILED"


@dataclass
class _Maps:
    """The pinned maps of one datapath instance, open."""

    denied_id: int
    denied_fd: int
    created_fd: int
    counters_fd: int
    reader: DeniedMapReader
    diff: DeniedDiff
    baseline_pending: bool  # the first read only sets the starting point
    events_lost_seen: int = 0

    def close(self) -> None:
        for fd in (self.denied_fd, self.created_fd, self.counters_fd):
            os.close(fd)


class FqdnPolicyReceiver(Receiver):
    def __init__(self, settings: CreateSettings, config: FqdnPolicyReceiverConfig, next_consumer: Consumer) -> None:
        super().__init__(settings, next_consumer)
        self.config = config
        self._layout: DeniedLayout | None = None
        self._ncpus = 0
        self._maps: _Maps | None = None
        self._first_poll = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = ""  # what the last log line said, so a steady state is logged once
        self._lock = threading.Lock()

    def start(self) -> None:
        try:
            import bcc.libbcc  # noqa: F401  # the map syscalls go through the system's libbcc (pinned.py)
        except ImportError as exc:
            raise StartError(self.settings.id, f"bcc is not importable ({exc})",
                             "install Debian's python3-bpfcc and run flowtel with the system Python "
                             "(a virtualenv needs --system-site-packages)") from None
        try:
            self._layout = header_layout()  # from the header's text: this receiver compiles nothing
        except (LookupError, TypeError, AttributeError) as exc:
            raise StartError(self.settings.id, f"cannot lay out the fqdn_denied structs of bpf/flowtel.h: {exc}",
                             "the installed bpf/flowtel.h is not the one this flowtel was built with; reinstall") from None
        self._ncpus = cpu_count_possible()
        telemetry = self.settings.telemetry
        telemetry.register_gauge(self.settings.id, "maps_attached", lambda: 1 if self._maps is not None else 0)
        # The first read now: whatever the maps held before the agent started is the baseline,
        # not news (it was reported by the agent that ran then, or happened while none ran).
        self._poll_safely()
        self._thread = threading.Thread(target=self._run, name="flowtel-fqdnpolicy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.config.collection_interval
        next_at = time.monotonic() + interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += interval
            self._poll_safely()

    def _poll_safely(self) -> None:
        with self._lock:
            try:
                self._poll()
            except pinned.MapMismatch as exc:
                self._close_maps()
                self._note("mismatch", str(exc), logging.ERROR)
                self.report_status(Status.RECOVERABLE_ERROR, str(exc))
            except OSError as exc:
                # The maps stay open with their read state: the next read diffs against the last good one.
                self.settings.telemetry.add(self.settings.id, "read_errors")
                message = f"cannot read the FQDN policy maps under {self.config.pin_dir}: {exc}"
                self._note("error", message, logging.ERROR)
                self.report_status(Status.RECOVERABLE_ERROR, message)
            except Exception:
                # As the ebpf receiver's drain loop: one failed round must not end the thread.
                self.settings.telemetry.add(self.settings.id, "read_errors")
                log.exception("reading the FQDN policy counters failed")

    def _note(self, state: str, message: str, level: int = logging.INFO) -> None:
        if state != self._state:
            self._state = state
            log.log(level, "%s", message)

    def _close_maps(self) -> None:
        if self._maps is not None:
            self._maps.close()
            self._maps = None

    def _attach(self) -> _Maps | None:
        """The maps pinned now (the same ones as before, or newly opened), or None."""
        assert self._layout is not None
        pin_dir = self.config.pin_dir
        initial, self._first_poll = self._first_poll, False
        denied_path = f"{pin_dir}/{MAP_DENIED}"
        fd = pinned.open_pinned(denied_path)
        if fd is None:
            if self._maps is not None:
                log.warning("the FQDN policy maps under %s are gone (dnsproxy uninstalled?); waiting for them",
                            pin_dir)
                self._close_maps()
            self._note("waiting", f"no FQDN policy datapath pinned under {pin_dir} (no dnsproxy on this node yet); "
                                  "waiting for it")
            return None
        try:
            info = pinned.map_info(fd)
            if self._maps is not None and self._maps.denied_id == info.id:
                os.close(fd)  # the same map (a restarted proxy keeps its pins): keep reading the open one
                return self._maps
            pinned.check(info, denied_path, pinned.BPF_MAP_TYPE_LRU_HASH, self._layout.key_size,
                         self._layout.value_size)
            created_fd = self._open_counter(f"{pin_dir}/{MAP_DENIED_CREATED}", 1)
            try:
                counters_fd = self._open_counter(f"{pin_dir}/{MAP_COUNTERS}", CNT_EVENTS_LOST + 1)
            except BaseException:
                if created_fd is not None:
                    os.close(created_fd)
                raise
        except BaseException:
            os.close(fd)
            raise
        if created_fd is None or counters_fd is None:
            # The proxy is pinning its maps right now: look again next interval.
            os.close(fd)
            for other in (created_fd, counters_fd):
                if other is not None:
                    os.close(other)
            return None
        replaced = self._maps is not None
        self._close_maps()
        self._maps = _Maps(info.id, fd, created_fd, counters_fd, DeniedMapReader(fd, self._layout, info.max_entries),
                           DeniedDiff(), baseline_pending=initial)
        log.info("reading %s denied-packet counters under %s (map id %d)%s",
                 "replaced" if replaced else "the FQDN policy's", pin_dir, info.id,
                 ": counts before the agent started are not reported" if initial else "")
        self._state = "attached"
        self.report_status(Status.OK)
        return self._maps

    def _open_counter(self, path: str, min_entries: int) -> int | None:
        fd = pinned.open_pinned(path)
        if fd is None:
            return None
        try:
            info = pinned.map_info(fd)
            pinned.check(info, path, pinned.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8)
            if info.max_entries < min_entries:
                raise pinned.MapMismatch(f"{path} has {info.max_entries} slots; this agent expects {min_entries}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _poll(self) -> None:
        maps = self._attach()
        if maps is None:
            return
        ncpus = self._ncpus
        # The counters before the map: see DeniedDiff.update.
        created = pinned.read_percpu_u64(maps.created_fd, CNT_DENIED_CREATED, ncpus)
        events_lost = pinned.read_percpu_u64(maps.counters_fd, CNT_EVENTS_LOST, ncpus)
        snapshot = maps.reader.read()
        telemetry = self.settings.telemetry
        cid = self.settings.id
        if maps.baseline_pending:
            maps.diff.baseline(snapshot, created)
            maps.events_lost_seen = events_lost
            maps.baseline_pending = False
            return
        result = maps.diff.update(snapshot, created, maps.reader.decode_key)
        now = time.time_ns()
        node = self.settings.node_name
        records: list[Record] = list(self._to_flows(result.deltas))
        if result.evicted:
            telemetry.add(cid, "entries_evicted", result.evicted)
            records.append(LostEvents(now, LOST_DENIED_MAP_FULL, result.evicted, node))
            log.warning("%d denied-packet entries were evicted before they were read (the datapath's "
                        "fqdn_denied map is full); their latest counts are lost", result.evicted)
        # Losses before this agent attached belong to nobody's interval: start from the first read.
        lost = events_lost - maps.events_lost_seen
        maps.events_lost_seen = max(events_lost, maps.events_lost_seen)
        if lost > 0:
            telemetry.add(cid, "events_lost", lost)
            records.append(LostEvents(now, LOST_DENIED_UPDATE_FAILED, lost, node))
        if records:
            telemetry.add(cid, "records_out", len(records))
            self.next_consumer.consume(records)
        if self._state in ("error", "mismatch"):
            self.report_status(Status.OK)
            self._state = "attached"

    def _to_flows(self, deltas: list[DeniedDelta]) -> list[Flow]:
        node = self.settings.node_name
        offset = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        names: dict[int, str] = {}
        out = []
        for d in deltas:
            name = names.get(d.ifindex)
            if name is None:
                try:
                    name = names[d.ifindex] = socket.if_indextoname(d.ifindex)
                except OSError:  # the pod's veth is already gone
                    name = names[d.ifindex] = ""
            out.append(Flow(
                time_ns=d.last_ns + offset, node_name=node,
                verdict=Verdict.AUDIT if d.verdict == VERDICT_AUDIT else Verdict.DROPPED,
                ip_version=d.family, src_ip=d.src_ip, dst_ip=d.dst_ip, protocol=d.protocol,
                src_port=d.src_port, dst_port=d.dst_port, traffic_direction=TrafficDirection.EGRESS,
                is_reply=False, ethertype=0x86DD if d.family == 6 else 0x0800, ifindex=d.ifindex, ifname=name,
                packets=d.packets, bytes=d.bytes, tcp_flags=d.tcp_flags, kind=EventKind.DROP, drop_reason=DROP_REASON,
            ))
        return out

    def shutdown(self) -> None:
        """A last read, so packets denied since the previous interval are reported too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._poll_safely()
        with self._lock:
            self._close_maps()
