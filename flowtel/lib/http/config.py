"""The limits every HTTP server of the agent takes, as keys on its component's config
(flat, as the Collector's ``confighttp.ServerConfig`` is squashed into a component's)."""
from __future__ import annotations

from pydantic import Field, field_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import Duration


class HTTPServerSettings(ComponentConfig):
    """Mixed into the config of a component that serves HTTP."""

    max_connections: int = Field(
        default=64, ge=1, le=10_000,
        description="open connections at once; more are answered 503 and closed",
    )
    read_timeout: Duration = Field(
        default=10.0, gt=0, le=3600,
        description="a request (line, headers and body) must arrive whole within this; else the connection is closed",
    )
    idle_timeout: Duration = Field(
        default=60.0, gt=0, le=86_400,
        description="close a keep-alive connection with no request for this long",
    )
    max_request_header_bytes: int = Field(
        default=16_384, ge=1024, le=1_048_576,
        description="request line and headers larger than this are answered 431",
    )


class BrowserFacingSettings(HTTPServerSettings):
    """Also for servers a browser may reach (the flow API, the web UI)."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=("host names (besides localhost, IP addresses and the endpoint's own host) a request's Host "
                     "header may name, e.g. a name you reach the agent by through a proxy; DNS rebinding "
                     "protection refuses any other name"),
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        out = []
        for name in value:
            host = name.strip().lower().rstrip(".")
            if not host or any(c in host for c in "/:@ \t?#") or len(host) > 253:
                raise ValueError(f"expected a host name without port or scheme, e.g. flowtel.example.com, got {name!r}")
            out.append(host)
        return out
