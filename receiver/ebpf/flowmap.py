"""The tc program's counters (bpf/tc_flow.c): double-buffered flow maps and per-interface totals.

Flow maps are drained with :class:`flowtel.lib.bpf.doublebuffer.DoubleBuffer`, so every packet
counted in the kernel is reported exactly once and LRU evictions are counted. The program holds
the counts of the flow each interface and hook saw last on a CPU in a per-CPU cache beside the
maps (``struct flow_cache_entry``), double-buffered with them: a drain adds the drained buffer's
cache entries to the flows it drains (a cache entry whose key the map does not hold is a flow of
its own) and zeroes them before that buffer is active again.

Per-interface totals are a per-CPU array indexed by ``slot * 2 + hook``, the slot being the one
the attach manager gave the interface (carried by its filters' classid). Elements are never
reset: the node's totals are the sums over every slot ever used, so the counts of a link that
went away stay in them (folded into the running totals by construction) while its slot serves a
new link; an interface's own totals are its slot's counts minus the baseline read when the slot
was assigned to it.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any

from flowtel.lib.bpf.batch import read_batch
from flowtel.lib.bpf.constants import HEADER
from flowtel.lib.bpf.doublebuffer import DoubleBuffer
from flowtel.lib.bpf.lastkey import LastKeyCache

CNT_FLOWS_CREATED = (HEADER.CNT_FLOWS_CREATED_0, HEADER.CNT_FLOWS_CREATED_1)
CNT_FLOW_UPDATE_FAIL = HEADER.CNT_FLOW_UPDATE_FAIL
CNT_IFACE_UPDATE_FAIL = HEADER.CNT_IFACE_UPDATE_FAIL
HOOKS = (HEADER.HOOK_INGRESS, HEADER.HOOK_EGRESS)


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
    last_ns: int
    tcp_flags: int
    first_ns: int
    syn: int
    synack: int
    fin: int
    rst: int


@dataclass(slots=True)
class DrainResult:
    flows: list[RawFlow]
    evicted: int  # flows the LRU dropped before this drain (their counts are lost)
    update_failures: int  # packets not counted in any flow since the last drain
    iface_failures: int = 0  # packets not counted in interface totals (no slot) since the last drain


FlowKey = tuple[bytes, bytes, int, int, int, int, int, int, int]


def _key(f: RawFlow) -> FlowKey:
    return (f.saddr, f.daddr, f.ifindex, f.sport, f.dport, f.ethertype, f.family, f.protocol, f.hook)


def _add(into: RawFlow, more: RawFlow) -> None:
    """Counts of one key from two places (the map and a CPU's cache, or two CPUs' caches)."""
    into.packets += more.packets
    into.bytes += more.bytes
    into.last_ns = max(into.last_ns, more.last_ns)
    into.tcp_flags |= more.tcp_flags
    if more.first_ns and (not into.first_ns or more.first_ns < into.first_ns):
        into.first_ns = more.first_ns
    into.syn += more.syn
    into.synack += more.synack
    into.fin += more.fin
    into.rst += more.rst


class FlowMaps:
    """The double-buffered flow maps and the counters of one loaded ``tc_flow.c``."""

    def __init__(self, bpf: Any) -> None:
        self._counters = bpf["counters"]
        # struct flow_cache_entry (flowtel.h): a flow key's fields, then flow_stats's, as RawFlow's.
        cache = LastKeyCache(bpf, "flow_cache", HEADER.FLOW_CACHE_WAYS, RawFlow, RawFlow.__slots__, _key, _add)
        self._buffer: DoubleBuffer[RawFlow] = DoubleBuffer(
            bpf, "flows", "flow_active", RawFlow, RawFlow.__slots__,
            self._counter, CNT_FLOWS_CREATED, cache=cache)
        self.max_entries = self._buffer.max_entries
        self._seen = {CNT_FLOW_UPDATE_FAIL: 0, CNT_IFACE_UPDATE_FAIL: 0}
        self._lock = threading.Lock()

    def _counter(self, index: int) -> int:
        return int(self._counters.sum(ctypes.c_int(index)).value)

    def _delta(self, index: int) -> int:
        value = self._counter(index)
        delta = value - self._seen[index]
        self._seen[index] = value
        return delta

    @property
    def buffer(self) -> DoubleBuffer[RawFlow]:
        """The flow maps' double buffer: drained by :class:`flowtel.lib.bpf.earlydrain.Drain`."""
        return self._buffer

    def failures(self) -> tuple[int, int]:
        """Packets counted in no flow, and in no interface total (no slot), since the last call."""
        with self._lock:
            return self._delta(CNT_FLOW_UPDATE_FAIL), self._delta(CNT_IFACE_UPDATE_FAIL)

    def drain(self, *, writers_stopped: bool = False) -> DrainResult:
        """Report and clear everything counted since the last drain, in one list.

        With ``writers_stopped`` (programs detached) both maps are emptied without a flip.
        """
        drained = self._buffer.drain(writers_stopped=writers_stopped)
        return DrainResult(drained.entries, drained.evicted, *self.failures())

    def fill(self) -> int:
        """Entries created in the active flow map since it was last drained (one counter read)."""
        return self._buffer.fill()


class InterfaceCounters:
    """Cumulative (packets, bytes) per interface slot and hook, from the per-CPU array."""

    def __init__(self, bpf: Any, slots: int) -> None:
        from bcc.utils import get_possible_cpus

        self._table = bpf["iface_counters"]
        self.slots = slots
        self._cpus = len(get_possible_cpus())
        n = slots * 2
        if self._table.max_entries != n:
            raise RuntimeError(f"iface_counters has {self._table.max_entries} entries, expected {n}")
        self._vsz = 16 * self._cpus  # struct iface_stats is 16 bytes, 8-aligned
        self._keys = (ctypes.c_uint32 * n)()
        self._values = ctypes.create_string_buffer(self._vsz * n)
        self._lock = threading.Lock()
        self._used = 0  # slots below this one have been assigned at some time
        self._baselines: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}

    def _read(self, upto: int) -> list[tuple[int, int]]:
        """(packets, bytes) summed over CPUs of elements [0, upto * 2)."""
        n = upto * 2
        if n == 0:
            return []
        got = read_batch(self._table.get_fd(), self._keys, 4, self._values, self._vsz, n, delete=False,
                         name="iface_counters")
        words = memoryview(self._values).cast("B")[: self._vsz * got].cast("Q")
        per = 2 * self._cpus
        out = []
        for i in range(got):
            w = words[i * per:(i + 1) * per]
            out.append((sum(w[0::2]), sum(w[1::2])))
        return out

    def assigned(self, slot: int) -> None:
        """A slot was just given to a new interface (before its filters exist): its baseline."""
        with self._lock:
            self._used = max(self._used, slot + 1)
            values = self._read(slot + 1)
            self._baselines[slot] = (values[slot * 2], values[slot * 2 + 1])

    def node_totals(self) -> dict[int, tuple[int, int]]:
        """{hook: (packets, bytes)} over every slot ever used: removed links included."""
        with self._lock:
            values = self._read(self._used)
        out = {hook: (0, 0) for hook in HOOKS}
        for i, (packets, nbytes) in enumerate(values):
            p, b = out[i & 1]
            out[i & 1] = (p + packets, b + nbytes)
        return out

    def interface_totals(self, slots: dict[int, int]) -> dict[tuple[int, int], tuple[int, int]]:
        """{(ifindex, hook): (packets, bytes)} since each interface got its slot (``{ifindex: slot}``)."""
        with self._lock:
            values = self._read(self._used)
            baselines = dict(self._baselines)
        out: dict[tuple[int, int], tuple[int, int]] = {}
        for ifindex, slot in slots.items():
            if slot * 2 + 1 >= len(values):
                continue
            base = baselines.get(slot, ((0, 0), (0, 0)))
            for hook in HOOKS:
                packets, nbytes = values[slot * 2 + hook]
                out[(ifindex, hook)] = (packets - base[hook][0], nbytes - base[hook][1])
        return out
