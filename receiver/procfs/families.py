"""The metric families the receiver emits, which kernel counters feed each, and the default
selection of statistics. Pure: parsed counters in, :class:`MetricPoint` lists out.

Names and labels are ACNS/Retina's (``reference/metric-compat.md``); the statistic names are
the kernel's own, as Retina's linuxutil plugin reports them. Retina selects a curated set of
drop counters (``netstatCuratedKeys`` in ``pkg/plugin/linuxutil``); flowtel's defaults are that
set plus the retransmission, timeout and error counters an operator looks at first. Every
other counter of the same sections can be added with ``include_statistics``.
"""
from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

from flowtel.records import MetricKind, MetricPoint
from receiver.procfs.snmp import Sections
from receiver.procfs.sockets import TCP_STATES

PREFIX = "networkobservability_"


@dataclass(frozen=True, slots=True)
class StatisticFamily:
    """A family labelled by ``statistic_name``, fed by sections of the counter files."""

    key: str  # the key under the receiver's `metrics` config
    name: str
    description: str
    # (file, section) in priority order: should two sections ever print the same name, the
    # first one's counter is reported (no current kernel does; names stay unique per family).
    sources: tuple[tuple[str, str], ...]
    defaults: frozenset[str]

    @property
    def files(self) -> frozenset[str]:
        return frozenset(file for file, _ in self.sources)


# Values in these files that are settings or current levels, not counters: a cumulative sum
# must never carry them. Same list as nstat's "useless numbers", plus MPTCP's current count.
NOT_COUNTERS: dict[str, frozenset[str]] = {
    "Ip": frozenset({"Forwarding", "DefaultTTL"}),
    "Tcp": frozenset({"RtoAlgorithm", "RtoMin", "RtoMax", "MaxConn", "CurrEstab"}),
    "MPTcpExt": frozenset({"MPCurrEstab"}),
}

# Retina's netstatCuratedKeys, exactly (it applies one list to TcpExt, IpExt and MPTcpExt).
RETINA_CURATED = frozenset({
    "ListenDrops", "LockDroppedIcmps", "PFMemallocDrop", "TCPBacklogDrop", "TCPDeferAcceptDrop",
    "TCPMinTTLDrop", "TCPRcvQDrop", "TCPReqQFullDrop", "TCPZeroWindowDrop", "InCsumErrors",
    "DataCsumErr", "AddAddrDrop", "RmAddrDrop",
})

TCP_CONNECTION_STATS = StatisticFamily(
    key="tcp_connection_stats",
    name=PREFIX + "tcp_connection_stats",
    description="TCP statistics of the node (/proc/net/netstat TcpExt and MPTcpExt, /proc/net/snmp Tcp), "
    "cumulative as the kernel counts them",
    sources=(("netstat", "TcpExt"), ("netstat", "MPTcpExt"), ("snmp", "Tcp")),
    # Retina's list, whose InCsumErrors here is the Tcp one (TcpExt has none), plus:
    defaults=RETINA_CURATED | frozenset({
        # TcpExt: queue overflows, retransmissions, timeouts, aborts.
        "ListenOverflows", "TCPTimeouts", "TCPSynRetrans", "TCPFastRetrans", "TCPSlowStartRetrans",
        "TCPLostRetransmit", "TCPAbortOnTimeout", "TCPAbortOnData",
        # Tcp (snmp): what `nstat` users know as TcpRetransSegs, TcpInErrs, …
        "RetransSegs", "InErrs", "OutRsts", "EstabResets", "AttemptFails",
    }),
)

IP_CONNECTION_STATS = StatisticFamily(
    key="ip_connection_stats",
    name=PREFIX + "ip_connection_stats",
    description="IP statistics of the node (/proc/net/snmp Ip, /proc/net/netstat IpExt, /proc/net/snmp6 Ip6), "
    "cumulative as the kernel counts them",
    sources=(("snmp", "Ip"), ("netstat", "IpExt"), ("snmp6", "Ip6")),
    defaults=frozenset({
        # IpExt (InCsumErrors is Retina's one IP statistic)
        "InCsumErrors", "InNoRoutes", "InTruncatedPkts", "InOctets", "OutOctets",
        # Ip
        "InHdrErrors", "InAddrErrors", "InDiscards", "OutDiscards", "OutNoRoutes", "ReasmFails", "FragFails",
        # Ip6
        "Ip6InHdrErrors", "Ip6InAddrErrors", "Ip6InNoRoutes", "Ip6InTruncatedPkts", "Ip6InDiscards",
        "Ip6OutDiscards", "Ip6OutNoRoutes", "Ip6InOctets", "Ip6OutOctets",
    }),
)

UDP_CONNECTION_STATS = StatisticFamily(
    key="udp_connection_stats",
    name=PREFIX + "udp_connection_stats",
    description="UDP statistics of the node (/proc/net/snmp Udp, /proc/net/snmp6 Udp6), cumulative as the kernel counts them",
    sources=(("snmp", "Udp"), ("snmp6", "Udp6")),
    defaults=frozenset({
        "InErrors", "NoPorts", "RcvbufErrors", "SndbufErrors", "InCsumErrors", "MemErrors",
        "Udp6InErrors", "Udp6NoPorts", "Udp6RcvbufErrors", "Udp6SndbufErrors", "Udp6InCsumErrors", "Udp6MemErrors",
    }),
)

STATISTIC_FAMILIES = (TCP_CONNECTION_STATS, IP_CONNECTION_STATS, UDP_CONNECTION_STATS)

INTERFACE_STATS = PREFIX + "interface_stats"
INTERFACE_STATS_DESCRIPTION = "Error and drop statistics per network interface (/proc/net/dev), cumulative"
# Retina's rule for its ethtool statistics: names containing "err" or "drop".
INTERFACE_DEFAULTS = frozenset({
    "rx_errors", "rx_dropped", "rx_fifo_errors", "rx_frame_errors",
    "tx_errors", "tx_dropped", "tx_fifo_errors", "tx_carrier_errors",
})

TCP_STATE = PREFIX + "tcp_state"
TCP_STATE_DESCRIPTION = "TCP sockets per state, IPv4 and IPv6 (/proc/net/tcp, /proc/net/tcp6)"
UNKNOWN_STATE = "UNKNOWN"

TCP_CONNECTION_REMOTE = PREFIX + "tcp_connection_remote"
TCP_CONNECTION_REMOTE_DESCRIPTION = ("TCP sockets by remote address; one series, address=\"AllIPs\", as Retina "
                                     "reports it (/proc/net/tcp, /proc/net/tcp6)")
# Retina (pkg/plugin/linuxutil) once labelled each remote address and now sums them all into
# this one value, for cardinality: a pod can open sockets to any number of addresses.
ALL_IPS = "AllIPs"

UDP_ACTIVE_SOCKETS = PREFIX + "udp_active_sockets"
UDP_ACTIVE_SOCKETS_DESCRIPTION = "Open UDP sockets, IPv4 and IPv6 (/proc/net/udp, /proc/net/udp6)"


class StatisticSelector:
    """Whether a statistic is reported: a default or matched by an include pattern, and not
    matched by an exclude pattern. Decisions are cached: the set of names is the kernel's,
    a few hundred at most."""

    __slots__ = ("_defaults", "_include", "_exclude", "_cache")

    def __init__(self, defaults: Iterable[str], include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        self._defaults = frozenset(defaults)
        self._include = tuple(re.compile(p) for p in include)
        self._exclude = tuple(re.compile(p) for p in exclude)
        self._cache: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        selected = self._cache.get(name)
        if selected is None:
            selected = (name in self._defaults or any(p.fullmatch(name) for p in self._include)) and not any(
                p.fullmatch(name) for p in self._exclude
            )
            self._cache[name] = selected
        return selected


class InterfaceFilter:
    """Interface names matching an include glob and no exclude glob."""

    __slots__ = ("_include", "_exclude", "_cache")

    # Pod veths come and go, so remembered decisions are forgotten past this many names.
    _CACHE_LIMIT = 4096

    def __init__(self, include: Iterable[str], exclude: Iterable[str]) -> None:
        self._include = tuple(include)
        self._exclude = tuple(exclude)
        self._cache: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        selected = self._cache.get(name)
        if selected is None:
            if len(self._cache) >= self._CACHE_LIMIT:
                self._cache.clear()
            selected = any(fnmatch.fnmatchcase(name, g) for g in self._include) and not any(
                fnmatch.fnmatchcase(name, g) for g in self._exclude
            )
            self._cache[name] = selected
        return selected


def statistic_points(
    family: StatisticFamily,
    selector: StatisticSelector,
    files: Mapping[str, Sections],
    time_ns: int,
    attributes: Mapping[str, str],
) -> list[MetricPoint]:
    """One cumulative point per selected counter of the family's sections."""
    out: list[MetricPoint] = []
    seen: set[str] = set()
    for file, section in family.sources:
        counters = files.get(file, {}).get(section)
        if not counters:
            continue
        not_counters = NOT_COUNTERS.get(section, frozenset())
        for name, value in counters.items():
            if name in not_counters or name in seen or not selector(name):
                continue
            seen.add(name)
            out.append(MetricPoint(
                family.name, value, MetricKind.SUM, time_ns,
                {**attributes, "statistic_name": name}, description=family.description,
            ))
    return out


def interface_points(
    interfaces: Mapping[str, Mapping[str, int]],
    selected_interface: InterfaceFilter,
    selector: StatisticSelector,
    time_ns: int,
    attributes: Mapping[str, str],
) -> list[MetricPoint]:
    out: list[MetricPoint] = []
    for ifname, stats in interfaces.items():
        if not selected_interface(ifname):
            continue
        for stat, value in stats.items():
            if selector(stat):
                out.append(MetricPoint(
                    INTERFACE_STATS, value, MetricKind.SUM, time_ns,
                    {**attributes, "interface_name": ifname, "statistic_name": stat},
                    description=INTERFACE_STATS_DESCRIPTION,
                ))
    return out


def tcp_state_points(states: Counter[int], time_ns: int, attributes: Mapping[str, str]) -> list[MetricPoint]:
    """Every known state, zeros included, so that a state whose last socket closed reads 0
    instead of keeping its last value (Retina only sets the states it saw)."""
    out = [
        MetricPoint(TCP_STATE, states.get(code, 0), MetricKind.GAUGE, time_ns, {**attributes, "state": name},
                    unit="{socket}", description=TCP_STATE_DESCRIPTION)
        for code, name in TCP_STATES.items()
    ]
    unknown = sum(n for code, n in states.items() if code not in TCP_STATES)
    if unknown:
        out.append(MetricPoint(TCP_STATE, unknown, MetricKind.GAUGE, time_ns, {**attributes, "state": UNKNOWN_STATE},
                               unit="{socket}", description=TCP_STATE_DESCRIPTION))
    return out


def tcp_connection_remote_point(states: Counter[int], time_ns: int, attributes: Mapping[str, str]) -> MetricPoint:
    """Retina's ``tcp_connection_remote``: every TCP socket of the namespace (each has a remote
    address, ``0.0.0.0:0`` for a listener, which Retina counts too), as one ``AllIPs`` series."""
    return MetricPoint(TCP_CONNECTION_REMOTE, sum(states.values()), MetricKind.GAUGE, time_ns,
                       {**attributes, "address": ALL_IPS}, unit="{socket}", description=TCP_CONNECTION_REMOTE_DESCRIPTION)


def udp_active_sockets_point(count: int, time_ns: int, attributes: Mapping[str, str]) -> MetricPoint:
    return MetricPoint(UDP_ACTIVE_SOCKETS, count, MetricKind.GAUGE, time_ns, dict(attributes),
                       unit="{socket}", description=UDP_ACTIVE_SOCKETS_DESCRIPTION)
