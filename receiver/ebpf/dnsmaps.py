"""The kernel's DNS maps (bpf/dns.h): the aggregation double buffer, the pending requests,
the latency histogram and the counters, read without losing a count.

The aggregation maps are drained as the flow maps are: flip ``dns_active``, wait for the
programs that already chose the old map, then empty it with
``BPF_MAP_LOOKUP_AND_DELETE_BATCH`` while nothing writes to it; its seen-set of names
(``dns_seen_<slot>``) is emptied with it, so every name gets a sample again next interval. Pending requests are read
in batches and the ones that timed out are deleted one by one: the kernel deletes an entry
when it matches a response, so whoever deletes it owns it and nothing is counted twice.
"""
from __future__ import annotations

import ctypes
import errno
import operator
import os
import time
from typing import Any, Callable, Iterator

from bcc.libbcc import lib

from receiver.ebpf.dnstypes import Aggregate, AggKey, Expired, KernelLatency
from flowtel.lib.bpf.layout import struct_for

FLIP_GRACE_S = 0.02
CHUNK_ENTRIES = 4096


def _picker(indexes: list[int]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """The fields at ``indexes`` of an unpacked struct, as a tuple, picked in C (a generator
    per row cost ~8 µs a drained key, measured)."""
    if len(indexes) == 1:
        only = indexes[0]
        return lambda row: (row[only],)
    return operator.itemgetter(*indexes)


def _is_pad(name: str) -> bool:
    # bcc names trailing padding __pad_end (and others __pad_N); flowtel.h's own are "pad".
    return name == "pad" or name.startswith("__pad")


class _Batch:
    """Buffers and decoders for batch reads of one hash map (allocated once)."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.fd = table.get_fd()
        self.n = table.max_entries
        self.ksz = ctypes.sizeof(table.Key)
        self.vsz = ctypes.sizeof(table.Leaf)
        # Read in chunks: the agent's memory does not grow with max_pending / max_aggregates.
        self.chunk = min(self.n, CHUNK_ENTRIES)
        self.keys = (table.Key * self.chunk)()
        self.values = (table.Leaf * self.chunk)()
        self.key_names: list[str] = []
        self.leaf_names: list[str] = []
        if issubclass(table.Leaf, ctypes.Structure):  # else only emptied (the seen-sets' bytes)
            self.key_struct, key_names = struct_for(table.Key)
            self.leaf_struct, leaf_names = struct_for(table.Leaf)
            self.key_fields = [i for i, n in enumerate(key_names) if not _is_pad(n)]
            self.leaf_fields = [i for i, n in enumerate(leaf_names) if not _is_pad(n)]
            self.key_names = [key_names[i] for i in self.key_fields]
            self.leaf_names = [leaf_names[i] for i in self.leaf_fields]
            self.pick_key = _picker(self.key_fields)
            self.pick_leaf = _picker(self.leaf_fields)

    def chunks(self, delete: bool) -> Iterator[int]:
        """Read the map a chunk at a time (deleting what was read, with ``delete``): yields
        how many entries the buffers hold now, valid until the next step."""
        op = lib.bpf_lookup_and_delete_batch if delete else lib.bpf_lookup_batch
        in_batch = ctypes.c_uint32(0)
        out_batch = ctypes.c_uint32(0)
        count = ctypes.c_uint32(0)
        first = True
        while True:
            count.value = self.chunk
            res = op(self.fd, None if first else ctypes.byref(in_batch), ctypes.byref(out_batch),
                     ctypes.byref(self.keys), ctypes.byref(self.values), ctypes.byref(count))
            err = ctypes.get_errno()
            if count.value:
                yield count.value
            if res != 0:
                if err == errno.ENOENT:
                    return
                raise OSError(err, f"batch read of {self.table.name!r}: {os.strerror(err)}")
            in_batch.value = out_batch.value
            first = False

    def rows(self, total: int) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
        kbuf = memoryview(self.keys).cast("B")[: self.ksz * total]
        vbuf = memoryview(self.values).cast("B")[: self.vsz * total]
        pk, pv = self.pick_key, self.pick_leaf
        return [(pk(k), pv(v)) for k, v in zip(self.key_struct.iter_unpack(kbuf), self.leaf_struct.iter_unpack(vbuf))]


class DnsMaps:
    """The DNS maps of one loaded tc_flow.c. Used by one thread (the DNS reader)."""

    def __init__(self, bpf: Any, counter_index: dict[str, int]) -> None:
        self._aggs = [_Batch(bpf["dns_agg_0"]), _Batch(bpf["dns_agg_1"])]
        expected_key = list(AggKey._fields)
        if self._aggs[0].key_names != expected_key or self._aggs[0].leaf_names != ["messages", "first_ns", "last_ns"]:
            raise RuntimeError(f"bpf/flowtel.h struct dns_agg_key {self._aggs[0].key_names} does not match "
                               f"AggKey {expected_key}")
        self._seen = [_Batch(bpf["dns_seen_0"]), _Batch(bpf["dns_seen_1"])]
        self._pending = _Batch(bpf["dns_pending"])
        expected_pending = [f for f in Expired._fields if f not in ("ts_ns", "name_hash", "qtype", "hook")]
        if self._pending.key_names != expected_pending:
            raise RuntimeError(f"bpf/flowtel.h struct dns_pending_key {self._pending.key_names} does not match")
        self._active = bpf["dns_active"]
        self._latency = bpf["dns_latency"]
        self._counters = bpf["dns_counters"]
        self._index = counter_index
        self.active = 0
        self._active[ctypes.c_int(0)] = ctypes.c_uint32(0)

    def flip(self) -> int:
        """Point the programs at the other buffer; returns the one to drain (after the grace)."""
        old = self.active
        self.active = 1 - old
        self._active[ctypes.c_int(0)] = ctypes.c_uint32(self.active)
        time.sleep(FLIP_GRACE_S)
        return old

    def drain(self, slot: int) -> list[Aggregate]:
        """Empty one buffer (nothing may write to it: after :meth:`flip`) and its seen-set."""
        batch = self._aggs[slot]
        make_key = AggKey._make
        out = [Aggregate(make_key(k), *v) for n in batch.chunks(delete=True) for k, v in batch.rows(n)]
        for _ in self._seen[slot].chunks(delete=True):
            pass  # the entries themselves say nothing user space needs
        return out

    def expire(self, deadline_ns: int) -> list[Expired]:
        """Remove and return the requests older than ``deadline_ns`` that nobody matched."""
        batch = self._pending
        out: list[Expired] = []
        ts_i = batch.leaf_names.index("ts_ns")
        ksz = batch.ksz
        # Deleting while walking: an entry deleted behind the batch cursor is not read again,
        # and one the kernel adds meanwhile is young (not expired) anyway.
        for n in batch.chunks(delete=False):
            for i, (k, v) in enumerate(batch.rows(n)):
                if v[ts_i] > deadline_ns:
                    continue
                # 0: we removed it, so its response did not come in time; else the kernel matched it.
                if lib.bpf_delete_elem(batch.fd, ctypes.byref(batch.keys, ksz * i)) == 0:
                    out.append(Expired(*k, *v))
        return out

    def latency(self) -> KernelLatency:
        per_cpu = self._latency[ctypes.c_int(0)]
        buckets = [0] * len(per_cpu[0].buckets)
        sum_ns = count = 0
        for cpu in per_cpu:
            for i, c in enumerate(cpu.buckets):
                buckets[i] += c
            sum_ns += cpu.sum_ns
            count += cpu.count
        return KernelLatency(tuple(buckets), sum_ns, count)

    def counter(self, name: str) -> int:
        return int(self._counters.sum(ctypes.c_int(self._index[name])).value)
