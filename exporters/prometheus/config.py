"""Config of the ``prometheus`` exporter."""
from __future__ import annotations

from pydantic import Field, field_validator

from flowtel.configtypes import Duration
from flowtel.lib.http import HTTPServerSettings


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to (host, port); raises ValueError with the expected form."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port such as 0.0.0.0:9965, got {value!r}")
    host = host.strip("[]")
    return host, int(port)


class PrometheusConfig(HTTPServerSettings):
    endpoint: str = Field(default="0.0.0.0:9965", description="address to serve /metrics on (port 0: any free port)")
    series_ttl: Duration = Field(default=300.0, description="drop a series without a new point for this long; 0 never")
    cardinality_limit: int = Field(default=100_000, ge=1, description="series per metric name; new ones beyond are refused and counted")
    self_telemetry: bool = Field(default=True, description="also serve the agent's own counters as flowtel_component_*")

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_port(value)
        return value
