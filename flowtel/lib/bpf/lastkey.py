"""A program's per-CPU "last key" cache in front of its double-buffered maps.

A program that counts floods of one key (bpf/tc_flow.c's ``flow_cache``: the last flow of each
interface and hook; bpf/kernel_events.c's ``drop_cache``: the last drop key) keeps that key's
counts in a per-CPU array entry instead of the map, and moves them into the map only when
another key arrives on the CPU. The array is double-buffered with the maps: ``ways`` entries per
buffer, index ``buffer * ways + way``; each entry is the key's fields then the counts', in the
order of the record type's ``__slots__``. So a drain must add what the drained buffer's entries
still hold to the drained entries of the same key, and report the keys only a cache held as
entries of their own. :class:`flowtel.lib.bpf.doublebuffer.DoubleBuffer` does that with one of
these (``cache=``); this object reads and resets the entries of a buffer, which it may do only
while nothing writes them: after the double buffer's flip and grace.
"""
from __future__ import annotations

import ctypes
from typing import Any, Callable, Generic, Hashable, Protocol, TypeVar

from flowtel.lib.bpf.batch import read_batch
from flowtel.lib.bpf.layout import struct_for



class Counted(Protocol):
    packets: int  # 0: an entry not used since it was zeroed (on this CPU)


T = TypeVar("T", bound=Counted)


class LastKeyCache(Generic[T]):
    """The per-CPU array ``name`` of one loaded bcc module, ``2 * ways`` entries.

    ``make(*fields)`` builds one record from an entry's fields (padding, ``pad…``, left out),
    which must be ``fields`` in order (checked at start: a changed struct is an error, not a
    garbled count); ``key(record)`` is what the map is keyed by; ``add(into, more)`` adds the
    counts of ``more`` (same key) to ``into``."""

    def __init__(self, bpf: Any, name: str, ways: int, make: Callable[..., T], fields: tuple[str, ...],
                 key: Callable[[T], Hashable], add: Callable[[T, T], None]) -> None:
        from bcc.utils import get_possible_cpus

        self._table = bpf[name]
        self._name = name
        self.ways = ways
        if self._table.max_entries != 2 * ways:
            raise RuntimeError(f"{name} has {self._table.max_entries} entries, expected {2 * ways} (per buffer: {ways})")
        leaf = self._table.Leaf  # of a per-CPU map: an array of the struct, one per CPU
        entry = getattr(leaf, "_type_", leaf)
        self._struct, names = struct_for(entry)
        self._fields = [i for i, n in enumerate(names) if not n.startswith("pad")]
        got = [names[i] for i in self._fields]
        if got != list(fields):
            raise RuntimeError(f"bpf/flowtel.h struct of {name} {got} does not match {list(fields)}")
        self._make, self.key, self.add = make, key, add
        self._cpus = len(get_possible_cpus())
        self._esz = (ctypes.sizeof(entry) + 7) // 8 * 8  # a per-CPU value is 8-aligned
        self._vsz = self._esz * self._cpus
        n = 2 * ways
        self._keys = (ctypes.c_uint32 * n)()
        self._values = ctypes.create_string_buffer(self._vsz * n)
        self._zero = ctypes.create_string_buffer(self._vsz)

    def take(self, slot: int) -> dict[Hashable, T]:
        """The counts buffer ``slot``'s entries hold, by key (summed over CPUs and ways), and
        those entries zeroed. Only while nothing writes buffer ``slot``."""
        from bcc.libbcc import lib

        n = 2 * self.ways
        fd = self._table.get_fd()
        got = read_batch(fd, self._keys, 4, self._values, self._vsz, n, delete=False, name=self._name)
        if got != n:
            raise OSError(f"{self._name}: read {got} of {n} entries")
        raw = self._values.raw
        out: dict[Hashable, T] = {}
        key, add, make, fields, unpack = self.key, self.add, self._make, self._fields, self._struct.unpack_from
        for way in range(slot * self.ways, (slot + 1) * self.ways):
            base = way * self._vsz
            if raw.count(0, base, base + self._vsz) == self._vsz:
                continue  # not used since it was last zeroed: nothing to write back
            for cpu in range(self._cpus):
                items = unpack(raw, base + cpu * self._esz)
                record = make(*[items[i] for i in fields])
                if not record.packets:
                    continue
                k = key(record)
                have = out.get(k)
                if have is None:
                    out[k] = record
                else:
                    add(have, record)
            index = ctypes.c_uint32(way)
            # The whole entry, key included: a stale key would let the next count of that key
            # add to an entry whose first time is an old interval's.
            if lib.bpf_update_elem(fd, ctypes.byref(index), self._zero, 0) != 0:
                raise OSError(f"{self._name}: zeroing entry {way} failed")
        return out

    def merge(self, entries: list[T], pending: dict[Hashable, T]) -> None:
        """Adds ``pending``'s counts to ``entries`` of the same key, removing them from
        ``pending`` (what is left are keys only the caches held)."""
        if not pending:
            return
        key, add = self.key, self.add
        for e in entries:
            more = pending.pop(key(e), None)
            if more is not None:
                add(e, more)
                if not pending:
                    return  # at most ways x CPUs keys: most of a large drain needs no lookup
