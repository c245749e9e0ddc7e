"""What the kernel's DNS maps hold (bpf/flowtel.h), as immutable Python values.

Kept apart from the map access (:mod:`receiver.ebpf.dnsmaps`, which needs bcc) so that the
pure logic in :mod:`receiver.ebpf.dns` and its tests do not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class AggKey(NamedTuple):
    """``struct dns_agg_key`` (padding removed), hashable: it keys user space's tallies.

    A named tuple, not a frozen dataclass: one is built per sample and per drained key, and
    hashed into the tallies and the flow templates; a tuple is built and hashed in C (a
    frozen dataclass of 12 fields costs ~3 µs to build and ~1 µs per hash, measured).
    """

    saddr: bytes
    daddr: bytes
    name_hash: int
    ifindex: int
    qtype: int
    port: int
    family: int
    hook: int
    is_response: int
    rcode: int
    status: int
    protocol: int


class Aggregate(NamedTuple):
    """One drained ``dns_agg_<slot>`` entry (a named tuple, as AggKey: one per key a drain)."""

    key: AggKey
    messages: int
    first_ns: int
    last_ns: int


class Expired(NamedTuple):
    """A request that got no response within the timeout (``dns_pending`` key and value)."""

    client: bytes
    server: bytes
    ifindex: int
    client_port: int
    server_port: int
    id: int
    family: int
    protocol: int
    ts_ns: int
    name_hash: int
    qtype: int
    hook: int


@dataclass(frozen=True, slots=True)
class KernelLatency:
    """The kernel's cumulative latency histogram, summed over CPUs."""

    bucket_counts: tuple[int, ...]
    sum_ns: int
    count: int
