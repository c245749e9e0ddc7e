"""The kernel's DNS maps (bpf/dns.h): the aggregation double buffer, the pending requests,
the latency histogram and the counters, read without losing a count.

The aggregation maps are drained as the flow maps are: flip ``dns_active``, wait for the
programs that already chose the old map, then empty it with
``BPF_MAP_LOOKUP_AND_DELETE_BATCH`` while nothing writes to it; its seen-set of names
(``dns_seen_<slot>``) is emptied with it, so every name gets a sample again next interval.
Pending requests live in a set-associative array the kernel frees with a compare-and-swap
when it matches a response; the ones that timed out are freed by ``flowtel_dns_sweep``, a
program run here with ``BPF_PROG_TEST_RUN`` over a chunk of sets at a time, which copies each
to ``dns_expired`` before its CAS: whoever frees a request owns it, nothing is counted twice.
"""
from __future__ import annotations

import ctypes
import errno
import struct
import operator
import os
import time
from typing import Any, Callable, Iterator

from bcc import BPF
from bcc.libbcc import lib

from receiver.ebpf.dnstypes import Aggregate, AggKey, Expired, KernelLatency
from flowtel.lib.bpf.layout import struct_for
from flowtel.lib.bpf.testrun import prog_test_run

FLIP_GRACE_S = 0.02
CHUNK_ENTRIES = 4096
_FRAME = bytes(64)


class _Sweep:
    """flowtel_dns_sweep (bpf/dns.h), run on a chunk of dns_pending's sets at a time."""

    def __init__(self, bpf: Any, sweep_sets: int) -> None:
        self.fd = bpf.load_func("flowtel_dns_sweep", BPF.SCHED_CLS).fd
        self.sets = bpf["dns_pending"].max_entries
        self.chunk = sweep_sets
        self.arg_table = bpf["dns_sweep"]
        self.arg = self.arg_table.Leaf()
        self.zero = ctypes.c_int(0)
        out = bpf["dns_expired"]
        self.out_fd = out.get_fd()
        self.out_keys = (out.Key * out.max_entries)()
        self.out_values = (out.Leaf * out.max_entries)()

    def run(self, first_set: int, deadline_ns: int) -> int:
        """Free the expired requests of one chunk; returns how many (in ``out_values``)."""
        self.arg.deadline_ns = deadline_ns
        self.arg.first_set = first_set
        self.arg.expired = 0
        self.arg_table[self.zero] = self.arg
        # A SCHED_CLS test run needs a packet (at least an Ethernet header); it reads none.
        prog_test_run(self.fd, _FRAME)
        n = int(self.arg_table[self.zero].expired)
        if n:
            # An array's batch read starts at index 0: the first n entries, one system call.
            out_batch = ctypes.c_uint32(0)
            count = ctypes.c_uint32(n)
            res = lib.bpf_lookup_batch(self.out_fd, None, ctypes.byref(out_batch), ctypes.byref(self.out_keys),
                                       ctypes.byref(self.out_values), ctypes.byref(count))
            err = ctypes.get_errno()
            if (res != 0 and err != errno.ENOENT) or count.value < n:
                raise OSError(err, f"batch read of 'dns_expired': {os.strerror(err)}")
        return n


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
    """Buffers for batch reads of one hash map (allocated once): the seen-sets, which are only
    emptied (their entries say nothing user space needs)."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.fd = table.get_fd()
        # Read in chunks: the agent's memory does not grow with max_aggregates.
        self.chunk = min(table.max_entries, CHUNK_ENTRIES)
        self.keys = (table.Key * self.chunk)()
        self.values = (table.Leaf * self.chunk)()

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


def _entry_struct(leaf: type[ctypes.Structure]) -> tuple[struct.Struct, list[str]]:
    """``struct dns_agg_entry`` as one ``struct.Struct``: its key's fields inlined (as
    struct_for gives them), then its own; padding from the real offsets."""
    fmt = ["="]
    names: list[str] = []
    pos = 0
    for name, ftype in ((f[0], f[1]) for f in leaf._fields_):
        offset = getattr(leaf, name).offset
        if offset > pos:
            fmt.append(f"{offset - pos}x")
        if issubclass(ftype, ctypes.Structure):
            sub, sub_names = struct_for(ftype)
            fmt.append(sub.format.lstrip("="))
            names.extend(f"{name}.{n}" for n in sub_names)
        else:
            sub, _ = struct_for(type("_One", (ctypes.Structure,), {"_fields_": [(name, ftype)]}))
            fmt.append(sub.format.lstrip("="))
            names.append(name)
        pos = offset + ctypes.sizeof(ftype)
    if ctypes.sizeof(leaf) > pos:
        fmt.append(f"{ctypes.sizeof(leaf) - pos}x")
    out = struct.Struct("".join(fmt))
    if out.size != ctypes.sizeof(leaf):
        raise TypeError(f"struct dns_agg_entry: derived size {out.size} != {ctypes.sizeof(leaf)}")
    return out, names


class _AggBuffer:
    """One aggregation buffer (bpf/flowtel.h, struct dns_agg_entry): its entries in the order
    the kernel created them, the way words that index them, and its entry count."""

    def __init__(self, bpf: Any, slot: int) -> None:
        self.slot = ctypes.c_int(slot)
        self.entries = bpf[f"dns_agg_{slot}"]
        self.next = bpf["dns_agg_next"]
        ways = bpf[f"dns_agg_ways_{slot}"]
        self.ways_fd = ways.get_fd()
        self.sets = ways.max_entries
        self.fd = self.entries.get_fd()
        self.max = self.entries.max_entries
        self.chunk = min(self.max, CHUNK_ENTRIES)
        self.keys = (self.entries.Key * self.chunk)()
        self.values = (self.entries.Leaf * self.chunk)()
        self.esz = ctypes.sizeof(self.entries.Leaf)
        self.struct, names = _entry_struct(self.entries.Leaf)
        fields = [i for i, n in enumerate(names) if not _is_pad(n.rsplit(".", 1)[-1])]
        self.names = [names[i] for i in fields]
        self.pick = _picker(fields)
        # Zeroing the way words: one batch update a chunk of sets, from buffers allocated once.
        self.zero_chunk = min(self.sets, CHUNK_ENTRIES)
        self.zero_keys = (ways.Key * self.zero_chunk)()
        self.zero_values = (ways.Leaf * self.zero_chunk)()

    def drain(self) -> list[tuple[Any, ...]]:
        """The entries created this interval that hold messages, as tuples of the entry's
        fields (key fields first); then the buffer is empty. Nothing may write to it."""
        n = min(int(self.next[self.slot].value), self.max)
        out: list[tuple[Any, ...]] = []
        done = 0
        in_batch = ctypes.c_uint32(0)
        out_batch = ctypes.c_uint32(0)
        count = ctypes.c_uint32(0)
        while done < n:
            count.value = min(self.chunk, n - done)
            res = lib.bpf_lookup_batch(self.fd, None if done == 0 else ctypes.byref(in_batch),
                                       ctypes.byref(out_batch), ctypes.byref(self.keys), ctypes.byref(self.values),
                                       ctypes.byref(count))
            err = ctypes.get_errno()
            got = count.value
            if res != 0 and err != errno.ENOENT:
                raise OSError(err, f"batch read of {self.entries.name!r}: {os.strerror(err)}")
            if got == 0:
                break
            buf = memoryview(self.values).cast("B")[: self.esz * got]
            out.extend(self.pick(row) for row in self.struct.iter_unpack(buf))
            done += got
            in_batch.value = out_batch.value
        for first in range(0, self.sets, self.zero_chunk):
            m = min(self.zero_chunk, self.sets - first)
            for i in range(m):
                self.zero_keys[i] = first + i
            cnt = ctypes.c_uint32(m)
            if lib.bpf_update_batch(self.ways_fd, ctypes.byref(self.zero_keys), ctypes.byref(self.zero_values),
                                    ctypes.byref(cnt)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"zeroing the way words of {self.entries.name!r}: {os.strerror(err)}")
        self.next[self.slot] = ctypes.c_uint64(0)
        return out


class DnsMaps:
    """The DNS maps of one loaded tc_flow.c. Used by one thread (the DNS reader)."""

    def __init__(self, bpf: Any, counter_index: dict[str, int], sweep_sets: int) -> None:
        self._aggs = [_AggBuffer(bpf, 0), _AggBuffer(bpf, 1)]
        expected = [f"key.{f}" for f in AggKey._fields] + ["messages", "first_ns", "last_ns"]
        if self._aggs[0].names != expected:
            raise RuntimeError(f"bpf/flowtel.h struct dns_agg_entry {self._aggs[0].names} does not match "
                               f"AggKey and Aggregate {expected}")
        self._nkey = len(AggKey._fields)
        self._seen = [_Batch(bpf["dns_seen_0"]), _Batch(bpf["dns_seen_1"])]
        self._sweep = _Sweep(bpf, sweep_sets)
        pending = bpf["dns_expired"].Leaf
        key_names = [f[0] for f in {f[0]: f[1] for f in pending._fields_}["key"]._fields_]
        # The key is the client's end only (bpf/flowtel.h); the rest of Expired is beside it.
        expected_pending = [f for f in Expired._fields
                            if f not in ("server", "ifindex", "server_port", "ts_ns", "name_hash", "qtype", "hook")]
        if key_names != expected_pending:
            raise RuntimeError(f"bpf/flowtel.h struct dns_pending_key {key_names} does not match")
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
        nk = self._nkey
        # An entry with no messages is one a CPU lost the race to create: not a key.
        out = [Aggregate(AggKey._make(row[:nk]), *row[nk:]) for row in self._aggs[slot].drain() if row[nk]]
        for _ in self._seen[slot].chunks(delete=True):
            pass  # the entries themselves say nothing user space needs
        return out

    def expire(self, deadline_ns: int) -> list[Expired]:
        """Free and return the requests no younger than ``deadline_ns`` that nobody matched."""
        sweep = self._sweep
        out: list[Expired] = []
        for first in range(0, sweep.sets, sweep.chunk):
            n = sweep.run(first, deadline_ns)
            for e in sweep.out_values[:n]:
                k = e.key
                out.append(Expired(bytes(k.client), bytes(e.server), e.ifindex, k.client_port, e.server_port, k.id,
                                   k.family, k.protocol, e.ts_ns, e.name_hash, e.qtype, e.hook))
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
