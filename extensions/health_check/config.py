"""Config of the ``health_check`` extension."""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from flowtel.lib.http import HTTPServerSettings

# Loopback, as the Collector's default (localhost:13133) is since its "localhost by
# default" change: the kubelet probes a hostNetwork pod on 127.0.0.1 (probes' `host`),
# and nothing else on the network needs the agent's health.
DEFAULT_ENDPOINT = "127.0.0.1:13133"


def split_endpoint(text: str) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT`` or ``[IPv6]:PORT``; ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:13133), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::]:13133, got {text!r}")
    return host, int(port)


class HealthCheckConfig(HTTPServerSettings):
    # Port 0 takes any free port (tests).
    endpoint: str = Field(default=DEFAULT_ENDPOINT, description="HOST:PORT to serve the health endpoints on")
    path: str = Field(default="/", description="readiness: 200 once started and every receiver is healthy")
    liveness_path: str = Field(default="/livez", description="liveness: 200 unless a component failed for good")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        split_endpoint(value)
        return value

    @field_validator("path", "liveness_path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value:
            raise ValueError(f"expected an absolute URL path such as /livez, got {value!r}")
        return value

    @model_validator(mode="after")
    def _distinct_paths(self) -> HealthCheckConfig:
        if self.path == self.liveness_path:
            raise ValueError(f"path and liveness_path must differ (both are {self.path!r})")
        return self
