"""Draining a pair of kernel maps that a program writes one at a time, without losing an increment.

The program writes to ``<name>_<active[0]>`` (one array read picks the map; no map-in-map). A
drain flips the index, waits for programs that already picked the old map to finish (tc and
tracepoint programs run to completion within microseconds; the wait is generous), then empties
the old map with ``BPF_MAP_LOOKUP_AND_DELETE_BATCH`` while nothing writes to it. So every
increment counted in the kernel is reported exactly once.

Entries the LRU evicted before a drain are counted: the kernel counts insertions per map (two
per-CPU counters), user space counts what it drained; the difference is what the maps lost.
Used for the tc flow maps (bpf/tc_flow.c) and the drop and connection flow maps (bpf/kernel_events.c).
"""
from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from flowtel.lib.bpf.batch import read_batch
from flowtel.lib.bpf.lastkey import LastKeyCache
from flowtel.lib.bpf.layout import struct_for

FLIP_GRACE_S = 0.02
# Entries a drain hands on at a time (drain_chunks): each chunk is built once the previous one
# went through the pipeline (or the wait ran out), so what an interval holds in memory is one
# chunk (≈ 4 KB a flow record with its wire form), not every distinct key of the interval (a
# connection-rate workload: 100k+). The pipeline's own batches are no larger (MAX_BATCH_RECORDS).
DRAIN_CHUNK_RECORDS = 8192
# Of each collection interval, the share one drain may spend waiting for its chunks to be
# consumed; past it the rest is handed on at once and the queues' bounds apply (counted drops),
# so a stuck exporter cannot hold up the next drain.
DRAIN_WAIT_SHARE = 0.5

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Drained(Generic[T]):
    entries: list[T]
    evicted: int  # entries the LRU dropped before this drain (their counts are lost)


class DoubleBuffer(Generic[T]):
    """The two maps ``{name}_0``/``{name}_1`` and flag ``active`` of one loaded bcc module.

    ``make(*key_fields, *value_fields)`` builds one entry from the struct fields in header
    order, padding (fields named ``pad…``) left out; ``fields`` names them and is checked against the header so
    that a changed struct is an error at start, not a garbled record. ``counter(i)`` is the
    sum over CPUs of the kernel's counter ``i``; ``created`` the two insertion counters.
    ``cache``, if given, is the program's per-CPU "last key" cache beside the maps
    (:mod:`flowtel.lib.bpf.lastkey`): a drained buffer's cache entries are read and reset after
    the flip's grace (when nothing writes that buffer), their counts added to the drained
    entries of the same key, and keys only the cache held handed on as entries of their own.
    """

    def __init__(self, bpf: Any, name: str, active: str, make: Callable[..., T], fields: Sequence[str],
                 counter: Callable[[int], int], created: tuple[int, int],
                 cache: LastKeyCache[Any] | None = None) -> None:
        self._maps = [bpf[f"{name}_0"], bpf[f"{name}_1"]]
        self._cache = cache
        self._name = name
        self._active_table = bpf[active]
        self._counter = counter
        self._created = created
        self._make = make
        table = self._maps[0]
        self._key_struct, key_names = struct_for(table.Key)
        self._leaf_struct, leaf_names = struct_for(table.Leaf)
        self._key_fields = [i for i, n in enumerate(key_names) if not n.startswith("pad")]
        self._leaf_fields = [i for i, n in enumerate(leaf_names) if not n.startswith("pad")]
        got = [key_names[i] for i in self._key_fields] + [leaf_names[i] for i in self._leaf_fields]
        if got != list(fields):
            raise RuntimeError(f"bpf/flowtel.h structs of {name} {got} do not match {list(fields)}")
        self.max_entries = table.max_entries
        # Buffers for one whole map, allocated once: drains must not churn memory.
        self._keys = (table.Key * self.max_entries)()
        self._values = (table.Leaf * self.max_entries)()
        self._drained_total = [0, 0]
        self._lock = threading.Lock()
        self._set_active(0)

    def _set_active(self, slot: int) -> None:
        self._active_table[ctypes.c_int(0)] = ctypes.c_uint32(slot)
        self._active = slot

    @property
    def active(self) -> int:
        """The buffer the program writes now (0 or 1)."""
        return self._active

    def fill(self) -> int:
        """Entries the program created in the active map since that map was last drained (LRU
        evictions included): one read of a per-CPU counter, cheap enough to poll several times
        a second. A caller that drains when this passes a share of ``max_entries`` bounds the
        map's fill by design instead of by the collection interval. Read without the drain's
        lock (a drain in progress changes the result by at most that drain): only the thread
        that drains should ask."""
        slot = self._active
        return max(0, self._counter(self._created[slot]) - self._drained_total[slot])

    def drain(self, *, writers_stopped: bool = False) -> Drained[T]:
        """Everything counted since the last drain, removed from the kernel.

        With ``writers_stopped`` (programs detached) both maps are emptied without a flip.
        """
        out: list[T] = []
        evicted = self.drain_chunks(out.extend, len(self._keys), writers_stopped=writers_stopped)
        return Drained(out, evicted)

    def drain_chunks(self, sink: Callable[[list[T]], None], chunk: int, *, writers_stopped: bool = False) -> int:
        """:meth:`drain`, handing the entries to ``sink`` in lists of at most ``chunk``; returns
        the evicted count.

        The kernel side is the same (one flip, each map emptied into this object's buffers in
        one pass), so exactness does not depend on the chunking; only the Python objects are
        built a chunk at a time, each after ``sink`` returned from the previous one. A sink that
        waits until its chunk went through the pipeline bounds what one interval holds in
        memory by the chunk, not by the number of distinct flows in the interval.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        taken = self.take(writers_stopped=writers_stopped)
        for entries in taken.chunks(chunk):
            sink(entries)
        return taken.evicted

    def take(self, *, writers_stopped: bool = False) -> "Taken[T]":
        """The kernel half of a drain: flip, empty the old map (and its cache) and count its
        evictions, all under the lock; the entries are built later, by :meth:`Taken.chunks`,
        from a copy of the raw keys and values (144 bytes a tc flow entry).

        So the next flip need not wait for the entries of this one to be handed on: a caller
        that hands them on slowly (waiting for the pipeline) can watch :meth:`fill` meanwhile
        and take again. That is exact: once taken, the old map and its cache are empty and its
        insertion baseline is up to date, so the program may write it again (the second flip)
        while this drain's entries are still pending; each entry is in exactly one take.
        """
        with self._lock:
            if writers_stopped:
                time.sleep(FLIP_GRACE_S)
                slots = [1 - self._active, self._active]
            else:
                old = self._active
                self._set_active(1 - old)
                time.sleep(FLIP_GRACE_S)
                slots = [old]
            evicted = 0
            parts: list[_TakenSlot] = []
            for slot in slots:
                pending = self._cache.take(slot) if self._cache is not None else {}
                parts.append(self._take_slot(slot, pending))
                lost = self._counter(self._created[slot]) - self._drained_total[slot]
                if lost > 0:
                    # Counted once: later drains compare against the new baseline.
                    self._drained_total[slot] += lost
                    evicted += lost
            return Taken(self, parts, evicted)

    def _take_slot(self, slot: int, pending: dict[Any, T]) -> "_TakenSlot":
        table = self._maps[slot]
        ksz = ctypes.sizeof(table.Key)
        vsz = ctypes.sizeof(table.Leaf)
        total = read_batch(table.get_fd(), self._keys, ksz, self._values, vsz, self.max_entries,
                           delete=True, name=f"{self._name}_{slot}")
        # Counted as drained before the sink sees them: a sink that fails part-way loses
        # entries it was handed (its caller counts the failure), they were not evicted.
        self._drained_total[slot] += total
        # Copied out of the one pair of buffers, which the next take overwrites.
        return _TakenSlot(bytes(memoryview(self._keys).cast("B")[: ksz * total]),
                          bytes(memoryview(self._values).cast("B")[: vsz * total]), ksz, vsz, total, pending)

    def _entries(self, part: "_TakenSlot", chunk: int) -> Iterator[list[T]]:
        kf, vf, make = self._key_fields, self._leaf_fields, self._make
        ksz, vsz, pending = part.ksz, part.vsz, part.pending
        for start in range(0, part.total, chunk):
            end = min(part.total, start + chunk)
            keys = self._key_struct.iter_unpack(part.keys[ksz * start: ksz * end])
            values = self._leaf_struct.iter_unpack(part.values[vsz * start: vsz * end])
            entries = [make(*[k[i] for i in kf], *[v[i] for i in vf]) for k, v in zip(keys, values)]
            if pending:
                assert self._cache is not None
                self._cache.merge(entries, pending)
            yield entries
        rest: list[T] = list(pending.values())  # keys only the cache held
        for start in range(0, len(rest), chunk):
            yield rest[start:start + chunk]


@dataclass(frozen=True, slots=True)
class _TakenSlot:
    keys: bytes
    values: bytes
    ksz: int
    vsz: int
    total: int
    pending: dict[Any, Any]  # the cache's counts of this buffer, by key, until merged


class Taken(Generic[T]):
    """What one :meth:`DoubleBuffer.take` removed from the kernel, not yet built into entries.

    ``evicted``: entries the LRU dropped before it. ``chunks(n)`` builds the entries in lists of
    at most ``n``, each when asked for (once: a second pass would hand them on twice).
    """

    def __init__(self, owner: DoubleBuffer[T], parts: list[_TakenSlot], evicted: int) -> None:
        self._owner = owner
        self._parts: list[_TakenSlot] | None = parts
        self.evicted = evicted
        self.entries = sum(p.total for p in parts)  # map entries taken (cache-only keys not included)

    def chunks(self, chunk: int) -> Iterator[list[T]]:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        parts, self._parts = self._parts, None
        if parts is None:
            raise RuntimeError("a drain's entries are handed on once")
        for part in parts:
            yield from self._owner._entries(part, chunk)
