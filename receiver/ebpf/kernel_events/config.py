"""Config of the kernel-events source (drops and TCP health) the ``ebpf`` receiver hosts."""
from __future__ import annotations

from pydantic import Field, field_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import CollectionInterval, Duration


class DropsConfig(ComponentConfig):
    enabled: bool = True
    # One flow record per dropped packet (verdict DROPPED) besides the per-reason counters.
    events: bool = True


class TcpConfig(ComponentConfig):
    enabled: bool = True
    # One flow record per retransmission and per reset sent or received.
    events: bool = True
    # One flow record when a connection is established (with the client's handshake RTT)
    # and one when it closes (with its lifetime).
    connection_events: bool = True
    # Sockets tracked at once for the tcp_state gauge, RTT and lifetime; beyond it a socket
    # is not tracked and that is counted (lost events, source TCP_CONNECTION_TABLE_FULL).
    max_connections: int = Field(262_144, ge=1024, le=4_194_304)


class KernelEventsConfig(ComponentConfig):
    drops: DropsConfig = Field(default_factory=DropsConfig)
    tcp: TcpConfig = Field(default_factory=TcpConfig)
    # Kernel-to-user ring buffer shared by drop and TCP events; a burst larger than it is
    # lost and counted (lost events, source KERNEL_EVENTS_RING_BUFFER).
    ring_buffer_kb: int = Field(1024, ge=4, le=262_144)
    # How often cumulative counters are read into metric points.
    collection_interval: CollectionInterval = 10.0
    # Longest time an event waits in the ring buffer before it becomes a record.
    poll_interval: Duration = 0.5

    @field_validator("ring_buffer_kb")
    @classmethod
    def _ring_power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"ring_buffer_kb must be a power of two (4, 8, …, 1024, …), got {value}")
        return value


    @field_validator("poll_interval")
    @classmethod
    def _poll_range(cls, value: float) -> float:
        if not 0.01 <= value <= 10:
            raise ValueError("poll_interval must be between 10ms and 10s")
        return value

    @property
    def enabled(self) -> bool:
        return self.drops.enabled or self.tcp.enabled
