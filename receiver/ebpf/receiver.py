"""The ``ebpf`` receiver: tc programs on matching interfaces, flow counters drained on an interval,
DNS packets read from a ring buffer (receiver/ebpf/dns*.py), and the kernel-events tracepoints
(receiver/ebpf/kernel_events), all compiled into one bcc module: one LLVM per agent."""
from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from typing import Any

from flowtel.component import Consumer, CreateSettings, Receiver, consumer_wants, wait_consumed
from flowtel.errors import StartError
from flowtel.records import Flow, LostEvents, Record, TcpFlagCounts, packet_flow, tcp_flag_counts
import bpf as bpf_sources
from flowtel.lib.bpf.tcattach import Interface, Program, TcAttachManager
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.direction import traffic_direction
from receiver.ebpf.dns import DnsTracker
from receiver.ebpf.dnsring import DnsRing
from receiver.ebpf.dnsring import cflags as dns_cflags
from flowtel.lib.bpf import kallsyms
from flowtel.lib.bpf.release import release_compiler_memory
from receiver.ebpf.dnsring import install_program as install_dns_program
from receiver.ebpf.dnsifaces import PodInterfaces
from flowtel.lib.bpf.tcattach import SlotAllocator
from flowtel.lib.bpf.doublebuffer import DRAIN_CHUNK_RECORDS
from flowtel.lib.bpf.earlydrain import FILL_POLL_S, Drain, EarlyDrain
from receiver.ebpf.flowmap import FlowMaps, InterfaceCounters, RawFlow
from receiver.ebpf.kernel_events import KernelEvents
from receiver.ebpf.reply import ReplyInference
from receiver.ebpf.nodemetrics import forward_points

log = logging.getLogger("flowtel.receiver.ebpf")


def kernel_at_least(major: int, minor: int, release: str | None = None) -> bool:
    """Whether the running kernel (``uname -r``) is at least ``major.minor``."""
    parts = (release or os.uname().release).split(".")
    try:
        return (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)) >= (major, minor)
    except (IndexError, ValueError):
        return False


LOST_FLOW_MAP_FULL = "FLOW_MAP_FULL"
LOST_FLOW_UPDATE_FAILED = "FLOW_MAP_UPDATE_FAILED"
LOST_INTERFACE_SLOTS_FULL = "INTERFACE_SLOTS_FULL"


@functools.lru_cache(maxsize=65536)
def _ip4(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET, raw[:4])


@functools.lru_cache(maxsize=65536)
def _ip6(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, raw)


def _monotonic_to_wall_offset() -> int:
    # bpf_ktime_get_ns() is CLOCK_MONOTONIC, as is time.monotonic_ns() on Linux.
    return time.time_ns() - time.monotonic_ns()


class EbpfReceiver(Receiver):
    def __init__(self, settings: CreateSettings, config: EbpfReceiverConfig, next_consumer: Consumer) -> None:
        super().__init__(settings, next_consumer)
        self.config = config
        self._bpf: Any = None
        self._maps: FlowMaps | None = None
        self._early: EarlyDrain | None = None
        self._ifaces: InterfaceCounters | None = None
        self._slots = SlotAllocator(config.max_interfaces)
        self._attach: TcAttachManager | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dns: DnsRing | None = None
        self._kernel_events: KernelEvents | None = None
        self._replies = ReplyInference()

    def start(self) -> None:
        try:
            from bcc import BPF
        except ImportError as exc:
            raise StartError(
                self.settings.id,
                f"bcc is not importable ({exc})",
                "install Debian's python3-bpfcc and run flowtel with the system Python "
                "(a virtualenv needs --system-site-packages); the PyPI package 'bcc' is unrelated",
            ) from None
        dns = self.config.dns
        defines: dict[str, int | str] = {"FLOWTEL_MAX_FLOWS": self.config.max_flows, "FLOWTEL_DNS": 0,
                                         "FLOWTEL_IFACE_SLOTS": self.config.max_interfaces,
                                         "FLOWTEL_COARSE_NS": int(kernel_at_least(5, 11))}
        if dns.enabled:
            defines.update(dns_cflags(dns))
        # Drops and TCP health come from tracepoints, compiled into the same module.
        self._kernel_events = KernelEvents(
            self.config.kernel_events,
            self.settings.node_name,
            self.settings.telemetry,
            self.next_consumer,
            component_id=self.settings.id,
        )
        text = bpf_sources.source("tc_flow.c")
        cflags = bpf_sources.cflags(**defines)
        events = self._kernel_events.prepare()  # StartError with a remedy if the kernel lacks a part
        if events is not None:
            text += "\n" + events[0]
            cflags += [f for f in events[1] if f not in cflags]
        try:
            self._bpf = BPF(text=text, cflags=cflags)
            tc = self._bpf.load_func("flowtel_tc", BPF.SCHED_CLS)  # both hooks (bpf/tc_flow.c)
            if dns.enabled:
                install_dns_program(self._bpf)
        except Exception as exc:
            self._bpf = None
            raise StartError(
                self.settings.id,
                f"cannot compile or load the eBPF programs: {exc}",
                "run `flowtel doctor`: it checks kernel headers, bcc, BTF and privileges and says what to install",
            ) from None
        self._maps = FlowMaps(self._bpf)
        self._early = EarlyDrain(self._maps.buffer, self.config.drain_at_fill, self.config.max_early_drains)
        self._ifaces = InterfaceCounters(self._bpf, self.config.max_interfaces)
        # Set up before the programs are attached: the ring is read from the first DNS packet on.
        if dns.enabled:
            tracker = DnsTracker(
                node_name=self.settings.node_name,
                timeout_ns=int(dns.timeout * 1e9),
                interface_of=self._interface,
                wall_offset_ns=_monotonic_to_wall_offset,
            )
            self._dns = DnsRing(self._bpf, tracker, self.settings, self.next_consumer,
                                report_interval=self.config.collection_interval)
        program = Program(tc.fd, tc.name.decode() if isinstance(tc.name, bytes) else tc.name)
        # DNS is counted once, at the first pod interface a message crosses: the kernel must
        # know which interfaces those are (bpf/dns.h).
        pods = PodInterfaces(self._bpf) if dns.enabled else None
        self._attach = TcAttachManager(
            self.config.interfaces,
            program,
            program,
            priority=self.config.tc_priority,
            slots=self._slots,
            on_slot=self._ifaces.assigned,
            on_attached=pods.attached if pods is not None else None,
            on_gone=pods.gone if pods is not None else None,
        )
        try:
            self._attach.start()
        except Exception as exc:
            raise StartError(
                self.settings.id,
                f"cannot attach tc programs: {exc}",
                "flowtel needs CAP_NET_ADMIN and CAP_BPF (run as root, or add them to the DaemonSet)",
            ) from None
        attach = self._attach
        self.settings.telemetry.register_gauge(self.settings.id, "interfaces_attached", lambda: len(attach.attached()))
        if pods is not None:
            # Pod interfaces dns_pod_ifaces had no room for (their DNS counts at both ends; logged).
            tracked = pods
            self.settings.telemetry.register_gauge(self.settings.id, "dns_pod_interfaces_untracked",
                                                   lambda: tracked.not_tracked)
        # Re-lists of the node's links after lost or malformed link events (each a full decode of
        # every link): a rising count means the watch's socket cannot keep up.
        self.settings.telemetry.register_gauge(self.settings.id, "link_relists", lambda: attach.resyncs)
        self.settings.telemetry.register_gauge(self.settings.id, "link_events_malformed", lambda: attach.malformed)
        self._thread = threading.Thread(target=self._run, name="flowtel-ebpf-drain", daemon=True)
        self._thread.start()
        if self._dns is not None:
            self._dns.start()
        try:
            self._kernel_events.start(self._bpf)
        except BaseException:
            self.shutdown()
            raise
        if self.config.kernel_events.drops.enabled and self.config.kernel_events.drops.events:
            # Drop locations are named from an index of kernel symbols: built now, a one-time
            # 0.2 s of start-up whose transient heap the release below gives back, rather than
            # at the first drop (in an idle agent's steady state).
            kallsyms.prime()
        # The agent's one compile is done (nothing else in it compiles): LLVM's freed heap and
        # its code pages go back to the kernel, about half of what the compile left resident.
        release_compiler_memory()

    def _interface(self, ifindex: int) -> Interface | None:
        return self._attach.interface(ifindex) if self._attach is not None else None

    def _run(self) -> None:
        assert self._maps is not None and self._early is not None
        early, telemetry, component = self._early, self.settings.telemetry, self.settings.id
        interval = self.config.collection_interval
        # Early drain (flowtel.lib.bpf.earlydrain): the active map's fill is one per-CPU counter
        # read (~10 µs), read every FILL_POLL_S, here and during each drain's waits for the
        # pipeline; past the threshold the buffers swap before the interval ends. Between two
        # reads the map can grow by (creation rate x FILL_POLL_S): with the default 50 % of
        # 65 536 that leaves room for 160k new flows/s (40k short connections/s) before the LRU
        # must evict. At most max_early_drains of them per interval, so that a pod creating
        # flows as fast as it can costs user space a bounded number of records (then the LRU
        # evicts, counted).
        poll = min(FILL_POLL_S, interval) if early.enabled else interval
        next_at = time.monotonic() + interval
        while not self._stop.wait(max(0.0, min(next_at - time.monotonic(), poll))):
            try:
                if time.monotonic() >= next_at:
                    next_at += interval
                    early.new_interval()
                elif not early.due():
                    continue
                else:
                    # Not a new interval: the scheduled drains keep their times, this one only
                    # cuts the current interval in two (each record has its own last-seen time).
                    telemetry.add(component, "early_drains")
                self._drain_once(writers_stopped=False)
            except Exception:
                telemetry.add(component, "drain_errors")
                log.exception("draining flow counters failed")

    def _drain_once(self, *, writers_stopped: bool) -> None:
        assert self._maps is not None
        telemetry, component = self.settings.telemetry, self.settings.id

        def hand_on(flows: list[Flow | LostEvents]) -> None:
            self.next_consumer.consume(flows)  # type: ignore[arg-type]  # a list is invariant: a batch of records

        drain: Drain[RawFlow, Flow | LostEvents] = Drain(
            self._maps.buffer, self.config.collection_interval, self._to_flows, hand_on,
            self._wait_consumed,
            early=self._early, on_early=lambda: telemetry.add(component, "early_drains"), chunk=DRAIN_CHUNK_RECORDS)
        try:
            drain.run(writers_stopped=writers_stopped)
        finally:
            telemetry.add(component, "records_out", drain.handed)
            if drain.waits_timed_out:
                telemetry.add(component, "drain_waits_timed_out", drain.waits_timed_out)
            if drain.abandoned:
                # Taken out of the kernel and never handed on (the hand-on raised): not silent.
                telemetry.add(component, "flows_abandoned", drain.abandoned)
            self._report_losses(drain.evicted)

    def _wait_consumed(self, timeout: float) -> bool:
        # Once shutdown began, a drain hands its rest on at once (the queues' bounds apply,
        # counted) instead of waiting up to DRAIN_WAIT_SHARE of an interval: shutdown waits for
        # this thread before its final drain, and must not give up on it and race it.
        return self._stop.is_set() or wait_consumed(self.next_consumer, timeout)

    def _report_losses(self, evicted: int) -> None:
        """After each drain: what the maps lost before its takes, and the node counters."""
        assert self._maps is not None
        telemetry = self.settings.telemetry
        update_failures, iface_failures = self._maps.failures()
        records: list[Record] = []
        now = time.time_ns()
        node = self.settings.node_name
        if evicted:
            telemetry.add(self.settings.id, "flows_evicted", evicted)
            records.append(LostEvents(now, LOST_FLOW_MAP_FULL, evicted, node))
            log.warning("flow map full: %d flows evicted before the drain (raise max_flows)", evicted)
        if update_failures:
            telemetry.add(self.settings.id, "flow_update_failures", update_failures)
            records.append(LostEvents(now, LOST_FLOW_UPDATE_FAILED, update_failures, node))
        if iface_failures:
            # Packets of interfaces that got no counter slot (all max_interfaces in use).
            telemetry.add(self.settings.id, "interface_total_failures", iface_failures)
            records.append(LostEvents(now, LOST_INTERFACE_SLOTS_FULL, iface_failures, node))
        telemetry.add(self.settings.id, "records_out", len(records))
        if records:
            self.next_consumer.consume(records)
        # A batch holds one signal: the node counters go as their own metrics batch.
        if consumer_wants(self.next_consumer, "metrics"):
            self.next_consumer.consume(forward_points(self.node_totals(), now))  # type: ignore[arg-type]  # a list is invariant: list[MetricPoint] is a batch of records all the same

    def _to_flows(self, raws: list[RawFlow]) -> list[Flow | LostEvents]:
        assert self._attach is not None
        node = self.settings.node_name
        offset = _monotonic_to_wall_offset()
        # (interface name, direction) per (ifindex, hook), keyed ifindex * 2 + hook (an int
        # hashes in C without a tuple built): asked of the attach manager once per batch.
        where: dict[int, tuple[str, Any]] = {}
        interface = self._attach.interface
        is_reply = self._replies.is_reply
        texts: dict[bytes, str] = {}
        # Shared per value (records.tcp_flag_counts), looked up here without its call per flow.
        flag_counts: dict[tuple[int, int, int, int], TcpFlagCounts] = {}
        out: list[Flow | LostEvents] = []
        append = out.append
        for r in raws:
            ifindex, hook = r.ifindex, r.hook
            at = where.get(ifindex * 2 + hook)
            if at is None:
                iface = interface(ifindex)
                at = where[ifindex * 2 + hook] = (iface.name if iface is not None else "",
                                                  traffic_direction(iface, hook))
            family, protocol = r.family, r.protocol
            if family == 4:
                # Addresses recur (a node's pods, their peers): formatted once per batch.
                saddr, daddr = r.saddr, r.daddr
                src = texts.get(saddr)
                if src is None:
                    src = texts[saddr] = _ip4(saddr)
                dst = texts.get(daddr)
                if dst is None:
                    dst = texts[daddr] = _ip4(daddr)
            elif family == 6:
                src, dst = _ip6(r.saddr), _ip6(r.daddr)
            else:
                src = dst = ""
            syn, synack = r.syn, r.synack
            if protocol == 6:
                key = (syn, synack, r.fin, r.rst)
                counts = flag_counts.get(key)
                if counts is None:
                    counts = flag_counts[key] = tcp_flag_counts(*key)
            else:
                counts = None
            append(packet_flow(
                r.last_ns + offset, node, family, src, dst, protocol, r.sport, r.dport, at[1],
                is_reply(protocol, src, r.sport, dst, r.dport, syn, synack) if family else None,
                r.ethertype, ifindex, at[0], r.packets, r.bytes, r.tcp_flags, counts,
            ))
        return out

    def interface_totals(self) -> dict[tuple[int, int], tuple[int, int]]:
        """Kernel-side (packets, bytes) per (ifindex, hook) of each attached interface since it was
        attached, exact even on flow map overflow."""
        if self._ifaces is None:
            return {}
        return self._ifaces.interface_totals(self._slots.assigned())

    def node_totals(self) -> dict[int, tuple[int, int]]:
        """Cumulative (packets, bytes) per hook over every interface ever attached (removed ones
        included), exact even on flow map overflow."""
        if self._ifaces is None:
            return {}
        return self._ifaces.node_totals()

    @property
    def attach_manager(self) -> TcAttachManager | None:
        return self._attach

    @property
    def dns(self) -> DnsRing | None:
        """The DNS reader, when DNS observation is enabled and the receiver started."""
        return self._dns

    def shutdown(self) -> None:
        """Detach first, then drain both maps and the DNS ring, so the last packets are reported too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._kernel_events is not None:
            self._kernel_events.stop()
            self._kernel_events = None
        if self._dns is not None:
            self._dns.stop()
        if self._attach is not None:
            self._attach.stop()
        if self._maps is not None:
            try:
                self._drain_once(writers_stopped=True)
            except Exception:
                log.exception("final drain of flow counters failed")
        if self._dns is not None:
            try:
                self._dns.final_drain()
            except Exception:
                log.exception("final read of DNS events failed")
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
