"""Config of the kernel-events source (drops and TCP health) the ``ebpf`` receiver hosts."""
from __future__ import annotations

import re

from pydantic import Field, field_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import CollectionInterval, Duration
from flowtel.lib.bpf.earlydrain import check_drain_at_fill


# Kernel drop reasons that are frees of data no network path lost: unread data discarded
# when an application closes its socket, Unix-domain sockets, bulk purges of socket queues.
# Retina and Hubble do not count them; reporting them would bury real drops.
DEFAULT_IGNORED_REASONS = ("SOCKET_CLOSE", "UNIX_DISCONNECT", "UNIX_SKIP_OOB", "QUEUE_PURGE")
# A sample costs user space tens of microseconds; beyond this the budget would let a drop flood
# take most of a core again, which is what aggregating drops in the kernel avoids.
MAX_DROP_EVENTS_PER_SECOND = 10_000


class DropsConfig(ComponentConfig):
    enabled: bool = True
    # Drop flow records (verdict DROPPED) besides the per-reason counters: drops aggregated in
    # the kernel per (addresses, ports, protocol, interface, namespace, direction, reason,
    # kernel location), one record per distinct key and collection interval with its counts.
    events: bool = True
    # Distinct drop flows per collection interval (each of two kernel maps); beyond it the
    # kernel map evicts and that is counted (lost events, source DROP_FLOW_MAP_FULL).
    max_flows: int = Field(16_384, ge=64, le=1_048_576)
    # Individual drops each CPU may also emit as events of their own per second (0: none): a
    # sample of drops with their exact time and detail (TCP flags and sequence number, length,
    # kernel location), as Hubble's per-packet drop events, on top of the counts. A token
    # bucket per CPU in the kernel enforces it (at most this many * (seconds + 1) per CPU in
    # any span); drops over it are counted (flowtel_drop_samples_suppressed_total), not lost.
    events_per_second: int = 0
    # Reasons (names as the kernel's skb:kfree_skb format prints them) neither counted nor
    # reported; [] reports every reason. Names this kernel lacks are skipped with a warning.
    ignore_reasons: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORED_REASONS))
    # NO_SOCKET for an ICMP/ICMPv6 echo reply no ping socket claimed: a raw-socket ping has
    # already got its copy, so by default it is not a drop.
    report_unclaimed_echo_replies: bool = False

    @field_validator("events_per_second")
    @classmethod
    def _sample_rate(cls, value: int) -> int:
        if not 0 <= value <= MAX_DROP_EVENTS_PER_SECOND:
            raise ValueError(f"events_per_second is drop events per CPU per second: 0 (off) to "
                             f"{MAX_DROP_EVENTS_PER_SECOND}, got {value}")
        return value

    @field_validator("ignore_reasons")
    @classmethod
    def _reason_names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name)]
        if bad:
            raise ValueError(f"drop reason names are upper-case kernel names such as SOCKET_CLOSE, got {bad}")
        return value


class TcpConfig(ComponentConfig):
    enabled: bool = True
    # One flow record per retransmission and per reset sent or received.
    events: bool = True
    # Connection records: sockets established and closed, aggregated in the kernel per
    # (local and remote address, server port, role, event, state left) and interval, with
    # their count, handshake RTT and lifetime sums (not one record per connection).
    connection_events: bool = True
    # Distinct connection keys per collection interval (each of two kernel maps); beyond it the
    # kernel map evicts and that is counted (lost events, source TCP_CONNECTION_FLOW_MAP_FULL).
    max_connection_flows: int = Field(16_384, ge=64, le=1_048_576)
    # Sockets tracked at once for the tcp_state gauge, RTT and lifetime (the kernel's table has
    # this many slots, in sets of 7, rounded up to a whole set); a socket that finds none of its
    # set's 7 slots free is not tracked and that is counted (lost events, source
    # TCP_CONNECTION_TABLE_FULL). Sized for a node's live sockets (listening and connected; not
    # TIME_WAIT, which the table does not hold), with room: a smaller table is warmer in the
    # cache, and each state change reads it (docs/performance.md, issue 17 point 3, fourth round).
    max_connections: int = Field(65_536, ge=1024, le=4_194_304)


class KernelEventsConfig(ComponentConfig):
    drops: DropsConfig = Field(default_factory=DropsConfig)
    tcp: TcpConfig = Field(default_factory=TcpConfig)
    # Kernel-to-user ring buffer of TCP events and drop samples (drops are aggregated); a burst larger than it is
    # lost and counted (lost events, source KERNEL_EVENTS_RING_BUFFER).
    ring_buffer_kb: int = Field(1024, ge=4, le=262_144)
    # How often cumulative counters are read into metric points, and the drop and connection
    # flow maps drained.
    collection_interval: CollectionInterval = 10.0
    # Drain the drop (or connection) flow map before the interval ends once it holds this share
    # of drops.max_flows (tcp.max_connection_flows); 0: only on the interval. Drops are keyed by
    # flow: a pod whose packets are dropped from new source ports (clients retrying against a
    # resolver that is down: each query a new port, each a NO_SOCKET drop) fills a 16 384-entry
    # map in 3 s at 5k drops/s, and the LRU evicts (counted, but the pod-level drop counts of
    # hubble_drop_total lose them). As the ebpf receiver's flow maps (flowtel/lib/bpf/earlydrain.py).
    drain_at_fill: float = Field(0.5, ge=0.0, le=0.9)
    # At most this many early drains per interval and map: a flood of new drop keys costs user
    # space at most (max_early_drains + 1) x max_flows records an interval; past it, evicted and
    # counted as without the early drain.
    max_early_drains: int = Field(8, ge=1, le=100)
    # Longest time an event waits in the ring buffer before it becomes a record.
    poll_interval: Duration = 0.5

    @field_validator("ring_buffer_kb")
    @classmethod
    def _ring_power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"ring_buffer_kb must be a power of two (4, 8, …, 1024, …), got {value}")
        return value


    @field_validator("drain_at_fill")
    @classmethod
    def _fill_range(cls, value: float) -> float:
        return check_drain_at_fill(value)

    @field_validator("poll_interval")
    @classmethod
    def _poll_range(cls, value: float) -> float:
        if not 0.01 <= value <= 10:
            raise ValueError("poll_interval must be between 10ms and 10s")
        return value

    @property
    def enabled(self) -> bool:
        return self.drops.enabled or self.tcp.enabled
