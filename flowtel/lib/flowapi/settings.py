"""Settings of a flow API endpoint (the ``flows`` and ``ui`` extensions' configs derive from them)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import Duration
from flowtel.lib.http import BrowserFacingSettings

def split_endpoint(text: str) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT`` or ``[IPv6]:PORT``; ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:4245), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:4245, got {text!r}")
    return host, int(port)


class ServiceMapConfig(ComponentConfig):
    granularity: Literal["workload", "pod"] = Field(
        default="workload", description="map nodes are workloads (falling back to pods) or always pods"
    )
    expire_after: Duration = Field(default=600.0, description="forget edges idle this long (0: never)")
    max_edges: int = Field(default=10_000, ge=1, le=1_000_000)


class FlowAPISettings(BrowserFacingSettings):
    """What every flow API endpoint takes; a component's config adds its ``endpoint`` default."""

    # Loopback by default (each component's default): the API is unauthenticated and shows
    # every flow of the node.
    endpoint: str = Field(default="127.0.0.1:0", description="HOST:PORT the flow API listens on")
    buffer_size: int = Field(default=4095, ge=1, le=1_000_000, description="flows kept in the ring")
    client_buffer_size: int = Field(
        default=1024, ge=1, le=1_000_000,
        description="flows queued per follower before its losses are counted and reported",
    )
    max_followers: int = Field(default=32, ge=1, le=4096, description="concurrent follow streams")
    service_map: ServiceMapConfig = Field(default_factory=ServiceMapConfig)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        split_endpoint(value)
        return value

    @model_validator(mode="after")
    def _room_beside_followers(self) -> FlowAPISettings:
        # Each follow stream holds a connection for as long as it runs.
        if self.max_connections <= self.max_followers:
            raise ValueError(f"max_connections ({self.max_connections}) must be larger than max_followers "
                             f"({self.max_followers}), or a full set of follow streams locks every other client out")
        return self
