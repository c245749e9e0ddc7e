"""The per-CPU "last drop" cache of ``flowtel_drop`` (bpf/kernel_events.c, ``drop_cache``).

Each CPU keeps the counts of the drop key it saw last, one entry per drop flow buffer, and moves
them into the buffer's map only when a drop of another key arrives on it; so a drain must add
what the drained buffer's entries still hold to the drained drop flows of the same key (or report
them as drop flows of their own: a flood of one key may never have reached the map). The entries
of a buffer are read and zeroed only while the buffer is not active (the double buffer's
``quiet`` hook, after the flip's grace): the program writes the active buffer's entry only.
"""
from __future__ import annotations

import ctypes
from typing import Any

from flowtel.lib.bpf.layout import struct_for
from receiver.ebpf.kernel_events.decode import RawDrop

DropKey = tuple[bytes, bytes, int, int, int, int, int, int, int, int, int, int]
_KEY_FIELDS = RawDrop.__slots__[:RawDrop.__slots__.index("packets")]


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


class DropCache:
    """``drop_cache`` of one loaded module: two per-CPU entries, index = drop flow buffer."""

    def __init__(self, bpf: Any) -> None:
        from bcc.utils import get_possible_cpus

        self._table = bpf["drop_cache"]
        if self._table.max_entries != 2:
            raise RuntimeError(f"drop_cache has {self._table.max_entries} entries, expected 2 (one per buffer)")
        leaf = self._table.Leaf  # of a per-CPU map: an array of the struct, one per CPU
        self._entry = getattr(leaf, "_type_", leaf)
        self._struct, names = struct_for(self._entry)
        self._fields = [i for i, n in enumerate(names) if not n.startswith("pad")]
        got = [names[i] for i in self._fields]
        if got != list(RawDrop.__slots__):
            raise RuntimeError(f"bpf/flowtel.h struct drop_cache_entry {got} does not match {list(RawDrop.__slots__)}")
        self._cpus = len(get_possible_cpus())
        self._esz = (ctypes.sizeof(self._entry) + 7) // 8 * 8  # a per-CPU value is 8-aligned
        self._vsz = self._esz * self._cpus
        self._value = ctypes.create_string_buffer(self._vsz)
        self._zero = ctypes.create_string_buffer(self._vsz)

    def take(self, slot: int) -> dict[DropKey, RawDrop]:
        """The counts buffer ``slot``'s entries hold, by drop key, and those entries zeroed."""
        from bcc.libbcc import lib

        fd = self._table.get_fd()
        index = ctypes.c_uint32(slot)
        if lib.bpf_lookup_elem(fd, ctypes.byref(index), self._value) != 0:
            raise OSError(f"drop_cache: reading entry {slot} failed")
        raw = self._value.raw
        out: dict[DropKey, RawDrop] = {}
        if raw.count(0) == self._vsz:
            return out  # no drop since it was last zeroed: nothing to write back
        for cpu in range(self._cpus):
            items = self._struct.unpack_from(raw, cpu * self._esz)
            drop = RawDrop(*[items[i] for i in self._fields])
            if not drop.packets:
                continue
            key = drop_key(drop)
            have = out.get(key)
            if have is None:
                out[key] = drop
            else:
                add(have, drop)
        # The whole entry, key included: a stale key would let the next drop of that key add to
        # an entry whose first_ns is an old interval's.
        if lib.bpf_update_elem(fd, ctypes.byref(index), self._zero, 0) != 0:
            raise OSError(f"drop_cache: zeroing entry {slot} failed")
        return out
