"""The per-CPU "last drop" cache of ``flowtel_drop`` (bpf/kernel_events.c, ``drop_cache``).

Each CPU keeps the counts of the drop key it saw last, one entry per drop flow buffer, and moves
them into the buffer's map only when a drop of another key arrives on it; the drop flows' double
buffer reads, merges and resets the drained buffer's entries
(:class:`flowtel.lib.bpf.lastkey.LastKeyCache`). What is here is what that needs to know of a
drop flow: its key and how two counts of one key add up.
"""
from __future__ import annotations

from typing import Any

from flowtel.lib.bpf.lastkey import LastKeyCache
from receiver.ebpf.kernel_events.decode import RawDrop

DropKey = tuple[bytes, bytes, int, int, int, int, int, int, int, int, int, int]


def drop_key(d: RawDrop) -> DropKey:
    return (d.saddr, d.daddr, d.location, d.reason, d.netns, d.ifindex, d.sport, d.dport, d.ethertype,
            d.family, d.protocol, d.direction)


def add(into: RawDrop, more: RawDrop) -> None:
    """Counts of one drop key from two places (the map and a CPU's cache, or two CPUs' caches)."""
    into.packets += more.packets
    into.bytes += more.bytes
    into.last_ns = max(into.last_ns, more.last_ns)
    into.tcp_flags |= more.tcp_flags
    if more.first_ns and (not into.first_ns or more.first_ns < into.first_ns):
        into.first_ns = more.first_ns


def drop_cache(bpf: Any) -> LastKeyCache[RawDrop]:
    """``drop_cache`` of one loaded module: one entry per CPU and drop flow buffer (struct
    drop_cache_entry: a drop flow key's fields, then drop_flow_stats's, as RawDrop's)."""
    return LastKeyCache(bpf, "drop_cache", 1, RawDrop, RawDrop.__slots__, drop_key, add)
