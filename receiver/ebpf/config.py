"""Config of the ``ebpf`` receiver."""
from __future__ import annotations

from pydantic import Field, field_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import CollectionInterval, Duration, InterfaceGlobs
from flowtel.lib.bpf.constants import HEADER
from flowtel.lib.bpf.earlydrain import check_drain_at_fill
from receiver.ebpf.kernel_events.config import KernelEventsConfig

# The port test is compiled into the tc program as one comparison per port: keep it short.
MAX_DNS_PORTS = 16


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class DnsConfig(ComponentConfig):
    """DNS observation on the tc path: which packets are DNS and how exchanges are matched."""

    enabled: bool = True
    ports: list[int] = Field(default_factory=lambda: [53], min_length=1, max_length=MAX_DNS_PORTS)
    # A query with no response within this time is reported as unanswered.
    timeout: Duration = 5.0
    max_pending: int = Field(65536, ge=16, le=4_194_304)
    # Payload bytes sent to user space per sample or TCP segment (a power of two: see bpf/dns.h).
    capture_bytes: int = Field(512, ge=64, le=8192)
    # Kernel-to-user ring buffer for samples and TCP segments; a burst larger than it is
    # counted (samples: counts stay exact; TCP segments: lost).
    ring_buffer_kb: int = Field(2048, ge=64, le=262_144)
    # UDP messages per second and CPU that reach user space one by one (as samples); the rest
    # are counted in the kernel and reported aggregated. User space's DNS cost is bounded by it.
    sample_rate: int = Field(100, ge=10, le=1_000_000)
    # Aggregation keys (interface, addresses, name, qtype, rcode, …) per interval and buffer;
    # messages beyond them are in the node totals only (counted as a loss of detail).
    max_aggregates: int = Field(16384, ge=256, le=1_048_576)

    @field_validator("ports")
    @classmethod
    def _ports_valid(cls, value: list[int]) -> list[int]:
        for port in value:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is not in 1..65535")
        if len(set(value)) != len(value):
            raise ValueError("ports must not repeat")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout_range(cls, value: float) -> float:
        if not 0.1 <= value <= 600:
            raise ValueError("timeout must be between 100ms and 10m")
        return value

    @field_validator("capture_bytes")
    @classmethod
    def _capture_power_of_two(cls, value: int) -> int:
        if not _power_of_two(value):
            raise ValueError(f"capture_bytes must be a power of two (64, 128, …, 8192), got {value}")
        return value

    @field_validator("ring_buffer_kb")
    @classmethod
    def _ring_power_of_two(cls, value: int) -> int:
        if not _power_of_two(value):
            raise ValueError(f"ring_buffer_kb must be a power of two (64, 128, …), got {value}")
        return value


class EbpfReceiverConfig(ComponentConfig):
    interfaces: InterfaceGlobs = Field(default_factory=lambda: ["veth*", "eth0"], min_length=1)
    collection_interval: CollectionInterval = 10.0
    max_flows: int = Field(65536, ge=1024, le=4_194_304)
    # Drain before the interval ends once the active flow map holds this share of max_flows
    # (0: only on the interval). A connection-rate workload creates four entries per connection
    # (two veths, two hooks): at 4k connections/s a 65 536-entry map is full in 4 s of a 10 s
    # interval and the LRU evicts (counted, lost). Draining at a fill level bounds the map by
    # design; the records of a partial interval are exported like any other.
    drain_at_fill: float = Field(0.5, ge=0.0, le=0.9)
    # At most this many early drains per collection interval: what a pod that makes new flows as
    # fast as it can (new source ports) costs user space stays bounded by design, at
    # (max_early_drains + 1) x max_flows records per interval; past it the LRU evicts, counted
    # (FLOW_MAP_FULL), as without the early drain. The default keeps ~6.5k short connections/s
    # exact with the shipped max_flows and interval.
    max_early_drains: int = Field(8, ge=1, le=100)
    tc_priority: int = Field(1, ge=1, le=65535)
    # Interfaces attached at the same time that get exact per-interface totals (counter slots,
    # reused when links go away, so this bounds live interfaces, not those over the node's life).
    # Slot + 1 travels with the hook in the tc filter's 16-bit classid (FLOWTEL_CLASSID_* in bpf/flowtel.h).
    max_interfaces: int = Field(4096, ge=16, le=HEADER.CLASSID_MAX_SLOTS)
    dns: DnsConfig = Field(default_factory=DnsConfig)

    @field_validator("drain_at_fill")
    @classmethod
    def _fill_range(cls, value: float) -> float:
        return check_drain_at_fill(value)

    kernel_events: KernelEventsConfig = Field(default_factory=KernelEventsConfig)


