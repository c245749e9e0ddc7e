"""The ``procfs`` receiver: the kernel's node-level network counters, polled on an interval."""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping

from flowtel.component import Consumer, CreateSettings, Receiver, consumer_wants
from flowtel.errors import StartError
from flowtel.records import MetricPoint
from receiver.procfs import families, sockdiag
from receiver.procfs.config import ProcfsReceiverConfig
from receiver.procfs.families import InterfaceFilter, StatisticFamily, StatisticSelector
from receiver.procfs.netdev import parse_net_dev
from receiver.procfs.netns import THREAD_NET, NamespaceReturnError, in_netns, read_files
from receiver.procfs.snmp import Sections, parse_paired, parse_snmp6
from receiver.procfs.sockets import socket_states

log = logging.getLogger("flowtel.receiver.procfs")

# The files of an IPv4-only node (booted with ipv6.disable=1) that do not exist.
_IPV6_FILES = frozenset({"snmp6", "tcp6", "udp6"})
_COUNTER_PARSERS: dict[str, Callable[[str], tuple[Sections, int]]] = {
    "snmp": parse_paired,
    "netstat": parse_paired,
    "snmp6": parse_snmp6,
}


@dataclass(slots=True)
class _Reading:
    """What one namespace gave in one poll."""

    texts: dict[str, str | OSError]
    tcp_states: Counter[int] | None = None  # from the sock_diag dump
    diag_errors: int = 0
    diag_failure: OSError | None = None


@dataclass(slots=True)
class _Namespace:
    label: str  # "" for the node's own namespace, else the `netns` entry as configured
    path: str  # namespace file to enter; "" for the node's own
    attributes: dict[str, str]


class ProcfsReceiver(Receiver):
    def __init__(self, settings: CreateSettings, config: ProcfsReceiverConfig, next_consumer: Consumer) -> None:
        super().__init__(settings, next_consumer)
        self.config = config
        metrics = config.metrics
        self._statistic_families: list[tuple[StatisticFamily, StatisticSelector]] = []
        for family in families.STATISTIC_FAMILIES:
            chosen = getattr(metrics, family.key)
            if chosen.enabled:
                selector = StatisticSelector(family.defaults, chosen.include_statistics, chosen.exclude_statistics)
                self._statistic_families.append((family, selector))
        iface = metrics.interface_stats
        self._interface_selector = (
            StatisticSelector(families.INTERFACE_DEFAULTS, iface.include_statistics, iface.exclude_statistics)
            if iface.enabled
            else None
        )
        self._interface_filter = InterfaceFilter(config.interfaces, config.exclude_interfaces)
        files: set[str] = set()
        for family, _ in self._statistic_families:
            files |= family.files
        if self._interface_selector is not None:
            files.add("dev")
        # tcp_state comes from sock_diag dumps where it can (see sockdiag.py), which see
        # the reading thread's namespace: not the one proc_path may point at.
        self._tcp_netlink = (
            metrics.tcp_state.enabled and metrics.tcp_state.source == "netlink" and config.proc_path == "/proc"
        )
        # tcp_connection_remote is a count of the same sockets tcp_state counts by state.
        self._tcp_sockets = metrics.tcp_state.enabled or metrics.tcp_connection_remote.enabled
        if self._tcp_sockets and not self._tcp_netlink:
            files |= {"tcp", "tcp6"}
        if metrics.udp_active_sockets.enabled:
            files |= {"udp", "udp6"}
        self._files = tuple(sorted(files))
        self._namespaces = [_Namespace("", "", {})] + [
            _Namespace(entry, config.netns_path(entry), {"netns": entry}) for entry in config.netns
        ]
        # (namespace label, file or "" for the whole namespace) -> reported problem.
        self._failing: dict[tuple[str, str], str] = {}
        self._netns_broken = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()
        self._last_poll_seconds = 0.0
        self._last_failure_log = 0.0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        net = os.path.join(self.config.proc_path, "net")
        if not os.path.isdir(net):
            raise StartError(
                self.settings.id,
                f"{net} does not exist, so there are no network counters to read",
                "set proc_path to a mounted proc filesystem: /proc (the default), or e.g. /host/proc/1 "
                "with the node's /proc mounted at /host/proc",
            )
        telemetry = self.settings.telemetry
        telemetry.register_gauge(self.settings.id, "poll_duration_seconds", lambda: self._last_poll_seconds)
        self._thread = threading.Thread(target=self._run, name="flowtel-procfs", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop polling; the polling thread polls once more, so the values at shutdown are
        reported too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        # First poll at once: a node's counters are known from the agent's first seconds.
        interval = self.config.collection_interval
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self._poll_and_emit()
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # a stalled poll: skip the missed ticks rather than burst
                next_at = now + interval
        # The final poll runs here too, not in the thread calling shutdown: reading another
        # namespace moves the polling thread into it for a moment, and if that were the main
        # thread, every thread's /proc/self/net would point into that namespace meanwhile.
        self._poll_and_emit()

    def _poll_and_emit(self) -> None:
        if not consumer_wants(self.next_consumer, "metrics"):
            return
        try:
            points = self.poll_once()
        except Exception:
            # Parsers count what they cannot read; an exception here is a bug, and one bad
            # poll must not end the polling.
            self.settings.telemetry.add(self.settings.id, "poll_failures")
            now = time.monotonic()
            if now - self._last_failure_log > 60:
                self._last_failure_log = now
                log.exception("polling node counters failed (counted as poll_failures)")
            return
        self.settings.telemetry.add(self.settings.id, "records_out", len(points))
        if points:
            self.next_consumer.consume(points)

    # -- one poll ------------------------------------------------------------------------

    def poll_once(self) -> list[MetricPoint]:
        """Read every namespace's counters once and return their metric points.

        With ``netns`` configured, call it from a thread other than the main one (see ``_run``).
        """
        # Public for tests and benchmarks: a caller's poll must not interleave with the thread's.
        with self._poll_lock:
            started = time.perf_counter()
            time_ns = time.time_ns()
            points: list[MetricPoint] = []
            parse_errors = 0
            for ns in self._namespaces:
                reading = self._read(ns)
                if reading is not None:
                    ns_points, errors = self._points(reading, time_ns, ns.attributes)
                    points.extend(ns_points)
                    parse_errors += errors
            telemetry = self.settings.telemetry
            telemetry.add(self.settings.id, "polls")
            telemetry.add(self.settings.id, "parse_errors", parse_errors)
            self._last_poll_seconds = time.perf_counter() - started
            return points

    def _collect(self, directory: str) -> _Reading:
        """Everything one namespace gives, read from inside it."""
        reading = _Reading(read_files(directory, self._files))
        if self._tcp_netlink:
            try:
                reading.tcp_states, reading.diag_errors = sockdiag.tcp_states()
            except OSError as exc:
                reading.diag_failure = exc
                reading.texts.update(read_files(directory, ("tcp", "tcp6")))
        return reading

    def _read(self, ns: _Namespace) -> _Reading | None:
        if not ns.path:
            reading = self._collect(f"{self.config.proc_path}/net")
        else:
            if self._netns_broken:
                return None
            try:
                reading = in_netns(ns.path, lambda: self._collect(THREAD_NET))
            except NamespaceReturnError as exc:
                self._netns_broken = True
                log.error("%s; reading other network namespaces is switched off until the agent restarts", exc)
                return None
            except OSError as exc:
                self._failed(ns.label, "", exc)
                return None
            self._recovered(ns.label, "")
        if reading.diag_failure is not None and self._tcp_netlink:
            # Files give the same counts: switch for good, and say so once.
            self._tcp_netlink = False
            self._files = tuple(sorted({*self._files, "tcp", "tcp6"}))
            log.warning(
                "socket diagnostics (NETLINK_SOCK_DIAG) failed: %s; tcp_state is read from /proc/net/tcp "
                "and /proc/net/tcp6 from now on (load the tcp_diag kernel module to use netlink)",
                reading.diag_failure.strerror or reading.diag_failure,
            )
        for name, result in reading.texts.items():
            if isinstance(result, OSError):
                self._failed(ns.label, name, result)
            else:
                self._recovered(ns.label, name)
        return reading

    def _points(self, reading: _Reading, time_ns: int, attributes: Mapping[str, str]) -> tuple[list[MetricPoint], int]:
        texts = {name: text for name, text in reading.texts.items() if isinstance(text, str)}
        errors = reading.diag_errors
        counters: dict[str, Sections] = {}
        for file, parse in _COUNTER_PARSERS.items():
            if file in texts:
                counters[file], e = parse(texts[file])
                errors += e
        points: list[MetricPoint] = []
        for family, selector in self._statistic_families:
            points.extend(families.statistic_points(family, selector, counters, time_ns, attributes))
        if self._interface_selector is not None and "dev" in texts:
            interfaces, e = parse_net_dev(texts["dev"])
            errors += e
            points.extend(families.interface_points(interfaces, self._interface_filter, self._interface_selector, time_ns, attributes))
        if self._tcp_sockets:
            states = reading.tcp_states
            if states is None and ("tcp" in texts or "tcp6" in texts):
                states = Counter()
                for file in ("tcp", "tcp6"):
                    if file in texts:
                        counts, e = socket_states(texts[file])
                        states.update(counts)
                        errors += e
            if states is not None and self.config.metrics.tcp_state.enabled:
                points.extend(families.tcp_state_points(states, time_ns, attributes))
            if states is not None and self.config.metrics.tcp_connection_remote.enabled:
                points.append(families.tcp_connection_remote_point(states, time_ns, attributes))
        if self.config.metrics.udp_active_sockets.enabled and ("udp" in texts or "udp6" in texts):
            sockets = 0
            for file in ("udp", "udp6"):
                if file in texts:
                    counts, e = socket_states(texts[file])
                    sockets += sum(counts.values())
                    errors += e
            points.append(families.udp_active_sockets_point(sockets, time_ns, attributes))
        return points, errors

    # -- problems are logged once, and once more when they go away ------------------------

    def _failed(self, label: str, file: str, exc: OSError) -> None:
        self.settings.telemetry.add(self.settings.id, "read_errors")
        key = (label, file)
        if key in self._failing:
            return
        where = f"network namespace {label!r}" if label else "the node's network namespace"
        if not file:
            what = f"cannot enter {where} ({self.config.netns_path(label)}): {exc.strerror or exc}"
            if exc.errno == errno.ENOENT:
                hint = "it does not exist (yet); it is skipped until it does"
            elif exc.errno in (errno.EPERM, errno.EACCES):
                hint = "entering a network namespace needs CAP_SYS_ADMIN: run the agent as root or add the capability"
            elif exc.errno == errno.EINVAL:
                hint = "the path is not a network namespace file (/run/netns/NAME or /proc/PID/ns/net)"
            else:
                hint = "it is skipped until it can be entered"
        else:
            what = f"cannot read net/{file} in {where}: {exc.strerror or exc}"
            if exc.errno == errno.ENOENT and file in _IPV6_FILES:
                hint = "IPv6 is disabled here; its statistics are skipped"
            elif exc.errno == errno.ENOENT:
                hint = "this kernel does not provide it; its statistics are skipped"
            else:
                hint = "its statistics are skipped until it can be read"
        message = f"{what}; {hint}"
        self._failing[key] = message
        log.warning("%s", message)

    def _recovered(self, label: str, file: str) -> None:
        if self._failing.pop((label, file), None) is not None:
            where = f"network namespace {label!r}" if label else "the node's network namespace"
            log.info("%s in %s can be read again", f"net/{file}" if file else "everything", where)
