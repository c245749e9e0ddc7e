"""Draining the in-kernel flow counters (bpf/tc_flow.c) without losing an increment.

The program writes to ``flow_maps[flow_active[0]]``. A drain flips the index, waits for
programs that already picked the old map to finish (tc programs run to completion in
softirq within microseconds; the wait is generous), then empties the old map with
``BPF_MAP_LOOKUP_AND_DELETE_BATCH`` while nothing writes to it. So every packet counted
in the kernel is reported exactly once.

Flows evicted by the LRU before a drain are counted: the kernel counts insertions per
map, user space counts what it drained; the difference is what the map lost.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from bcc.libbcc import lib

from receiver.ebpf.layout import struct_for

CNT_FLOWS_CREATED = (0, 1)  # FLOWTEL_CNT_FLOWS_CREATED_{0,1} in bpf/flowtel.h
CNT_FLOW_UPDATE_FAIL = 2
CNT_IFACE_UPDATE_FAIL = 3
FLIP_GRACE_S = 0.02


@dataclass(slots=True)
class RawFlow:
    saddr: bytes
    daddr: bytes
    ifindex: int
    sport: int
    dport: int
    ethertype: int
    family: int
    protocol: int
    hook: int
    packets: int
    bytes: int
    first_ns: int
    last_ns: int
    syn: int
    synack: int
    fin: int
    rst: int
    tcp_flags: int


@dataclass(slots=True)
class DrainResult:
    flows: list[RawFlow]
    evicted: int  # flows the LRU dropped before this drain (their counts are lost)
    update_failures: int  # packets not counted in any flow since the last drain


class FlowMaps:
    """The double-buffered flow maps of one loaded ``tc_flow.c``."""

    def __init__(self, bpf: Any) -> None:
        self._bpf = bpf
        self._maps = [bpf["flows_0"], bpf["flows_1"]]
        self._active_table = bpf["flow_active"]
        self._counters = bpf["counters"]
        outer = bpf["flow_maps"]
        for slot, table in enumerate(self._maps):
            outer[ctypes.c_int(slot)] = ctypes.c_int(table.get_fd())
        self._active = 0
        self._set_active(0)
        table = self._maps[0]
        self._key_struct, key_names = struct_for(table.Key)
        self._leaf_struct, leaf_names = struct_for(table.Leaf)
        # RawFlow takes the key fields then the value fields, padding removed.
        self._key_fields = [i for i, n in enumerate(key_names) if n != "pad"]
        self._leaf_fields = [i for i, n in enumerate(leaf_names) if n != "pad"]
        expected = [f for f in RawFlow.__slots__]
        got = [key_names[i] for i in self._key_fields] + [leaf_names[i] for i in self._leaf_fields]
        if got != expected:
            raise RuntimeError(f"bpf/flowtel.h flow structs {got} do not match RawFlow {expected}")
        self.max_entries = table.max_entries
        # Buffers for one whole map, allocated once: drains must not churn memory.
        self._keys = (table.Key * self.max_entries)()
        self._values = (table.Leaf * self.max_entries)()
        self._drained_total = [0, 0]
        self._evicted_total = 0
        self._update_fail_seen = 0
        self._lock = threading.Lock()

    def _set_active(self, slot: int) -> None:
        self._active_table[ctypes.c_int(0)] = ctypes.c_uint32(slot)
        self._active = slot

    def _counter(self, index: int) -> int:
        return int(self._counters.sum(ctypes.c_int(index)).value)

    def drain(self, *, writers_stopped: bool = False) -> DrainResult:
        """Report and clear everything counted since the last drain.

        With ``writers_stopped`` (programs detached) both maps are emptied without a flip.
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
            flows: list[RawFlow] = []
            evicted = 0
            for slot in slots:
                drained = self._drain_slot(slot, flows)
                self._drained_total[slot] += drained
                created = self._counter(CNT_FLOWS_CREATED[slot])
                lost = created - self._drained_total[slot]
                if lost > 0:
                    # Counted once: later drains compare against the new baseline.
                    self._drained_total[slot] += lost
                    evicted += lost
            self._evicted_total += evicted
            fails = self._counter(CNT_FLOW_UPDATE_FAIL)
            new_fails = fails - self._update_fail_seen
            self._update_fail_seen = fails
            return DrainResult(flows, evicted, new_fails)

    def _drain_slot(self, slot: int, out: list[RawFlow]) -> int:
        table = self._maps[slot]
        fd = table.get_fd()
        n = self.max_entries
        ksz = ctypes.sizeof(table.Key)
        vsz = ctypes.sizeof(table.Leaf)
        in_batch = ctypes.c_uint32(0)
        out_batch = ctypes.c_uint32(0)
        count = ctypes.c_uint32(0)
        total = 0
        first = True
        while total < n:
            count.value = n - total
            res = lib.bpf_lookup_and_delete_batch(
                fd,
                None if first else ctypes.byref(in_batch),
                ctypes.byref(out_batch),
                ctypes.byref(self._keys, ksz * total),
                ctypes.byref(self._values, vsz * total),
                ctypes.byref(count),
            )
            err = ctypes.get_errno()
            total += count.value
            if res != 0:
                if err == errno.ENOENT:
                    break
                raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH on flows_{slot}: {os.strerror(err)}")
            in_batch.value = out_batch.value
            first = False
        if total:
            self._decode(total, ksz, vsz, out)
        return total

    def _decode(self, total: int, ksz: int, vsz: int, out: list[RawFlow]) -> None:
        kbuf = memoryview(self._keys).cast("B")[: ksz * total]
        vbuf = memoryview(self._values).cast("B")[: vsz * total]
        kf = self._key_fields
        vf = self._leaf_fields
        for k, v in zip(self._key_struct.iter_unpack(kbuf), self._leaf_struct.iter_unpack(vbuf)):
            out.append(RawFlow(*[k[i] for i in kf], *[v[i] for i in vf]))

    @property
    def evicted_total(self) -> int:
        return self._evicted_total


def interface_totals(bpf: Any) -> dict[tuple[int, int], tuple[int, int]]:
    """Cumulative (packets, bytes) per (ifindex, hook) from the per-CPU totals map."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for key, per_cpu in bpf["iface_totals"].items():
        packets = sum(v.packets for v in per_cpu)
        nbytes = sum(v.bytes for v in per_cpu)
        out[(key.ifindex, key.hook)] = (packets, nbytes)
    return out

