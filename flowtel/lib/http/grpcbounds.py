"""Bounds for a gRPC server of the agent (the Hubble API), offered for the same threat as
the HTTP servers: any pod can reach a hostNetwork agent's ports.

``grpc.server(futures.ThreadPoolExecutor(limits.workers), **server_kwargs(limits))`` gives:
at most ``max_concurrent_rpcs`` calls at once (gRPC itself answers the next one
``RESOURCE_EXHAUSTED``), at most ``max_streams_per_connection`` streams on one HTTP/2
connection, idle connections closed after ``idle_timeout``, every connection recycled after
``max_connection_age`` (with a grace period for calls in flight), request messages and
metadata bounded, and clients that ping without calls cut off (HTTP/2 ping floods).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class GRPCLimits:
    max_concurrent_rpcs: int = 64
    max_streams_per_connection: int = 16
    idle_timeout: float = 300.0
    max_connection_age: float = 3600.0
    max_connection_age_grace: float = 30.0
    max_receive_message_bytes: int = 1 << 20  # requests are small filters; responses are not bounded here
    max_metadata_bytes: int = 16 << 10
    workers: int = 68  # one per concurrent call (streams hold theirs) and a few more


def server_options(limits: GRPCLimits) -> list[tuple[str, Any]]:
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    return [
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        ("grpc.max_connection_idle_ms", ms(limits.idle_timeout)),
        ("grpc.max_connection_age_ms", ms(limits.max_connection_age)),
        ("grpc.max_connection_age_grace_ms", ms(limits.max_connection_age_grace)),
        ("grpc.max_receive_message_length", limits.max_receive_message_bytes),
        ("grpc.max_metadata_size", limits.max_metadata_bytes),
        # A client may ping at most every 5 minutes without calls in flight; more pings are
        # strikes, and two strikes close the connection (gRPC's GOAWAY ENHANCE_YOUR_CALM).
        ("grpc.http2.min_ping_interval_without_data_ms", 300_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def server_kwargs(limits: GRPCLimits) -> dict[str, Any]:
    """Keyword arguments for ``grpc.server`` besides the executor."""
    return {"options": server_options(limits), "maximum_concurrent_rpcs": limits.max_concurrent_rpcs}
