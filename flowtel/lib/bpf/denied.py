"""The FQDN datapath's denied-packet counters (``fqdn_denied`` in bpf/fqdn_policy.c), read and diffed.

The kernel keeps cumulative per-entry counts and nobody deletes entries, so any number of
readers (this receiver in the agent, the proxy's own flow log) can read the map without
disturbing one another: each keeps its previous read and reports the difference.

- An entry's identity is its key *and* its ``first_ns``: the LRU may evict an entry and the
  next denied packet re-creates it with a new ``first_ns``; the new entry is reported whole.
- Evicted entries are counted as ``fqdn_denied_created`` (insertions, cumulative) minus the
  live entries: whatever an evicted entry counted since the previous read is lost, and the
  reader reports that as lost events. The created counter is read before the map, so a race
  with a concurrent insertion can only under-count for one read, never report a false loss.

This module is pure logic plus the batch-lookup syscall; layouts come from ``bpf/flowtel.h``
(bcc's ctypes classes where the process compiled the program, the header's text where it did
not: :mod:`flowtel.lib.bpf.layout`), never a copy.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass
from typing import Callable

from flowtel.lib.bpf.constants import HEADER
from flowtel.lib.bpf.layout import header_struct, struct_for

MAP_DENIED = "fqdn_denied"
MAP_DENIED_CREATED = "fqdn_denied_created"
MAP_COUNTERS = "fqdn_counters"
VERDICT_DROPPED, VERDICT_AUDIT = HEADER.FQDN_VERDICT_DROPPED, HEADER.FQDN_VERDICT_AUDIT
CNT_DENIED_CREATED = HEADER.FQDN_DENIED_CNT_CREATED
CNT_EVENTS_LOST = HEADER.FQDN_CNT_EVENTS_LOST  # denied packets the map could not take
# Cilium's drop reason for traffic a network policy denies (flow.proto DropReason 133).
DROP_REASON = "POLICY_DENIED"

_KEY_FIELDS = ("saddr", "daddr", "ifindex", "dport", "family", "protocol", "verdict")
_STATS_FIELDS = ("packets", "bytes", "first_ns", "last_ns", "last_sport", "tcp_flags")


@dataclass(frozen=True, slots=True)
class DeniedLayout:
    """Binary layouts of ``struct fqdn_denied_key`` and ``struct fqdn_denied_stats``."""

    key_type: type[ctypes.Structure]
    leaf_type: type[ctypes.Structure]

    @property
    def key_size(self) -> int:
        return ctypes.sizeof(self.key_type)

    @property
    def value_size(self) -> int:
        return ctypes.sizeof(self.leaf_type)


@dataclass(slots=True)
class DeniedDelta:
    """Denied packets of one entry since the reader's previous read."""

    src_ip: str
    dst_ip: str
    ifindex: int
    src_port: int  # the most recent packet's (the source port is not part of the key)
    dst_port: int
    family: int
    protocol: int
    verdict: int  # VERDICT_*
    packets: int
    bytes: int
    first_ns: int  # CLOCK_MONOTONIC, when the entry was created
    last_ns: int  # CLOCK_MONOTONIC, the most recent packet
    tcp_flags: int  # union since the entry was created


@dataclass(slots=True)
class DiffResult:
    deltas: list[DeniedDelta]
    evicted: int  # entries the LRU evicted since the previous read (their recent counts are lost)
    live: int  # entries in the map now


Stats = tuple[int, int, int, int, int, int]  # packets, bytes, first_ns, last_ns, last_sport, tcp_flags
# Raw key -> (src_ip, dst_ip, ifindex, dport, family, protocol, verdict).
KeyDecoder = Callable[[bytes], tuple[str, str, int, int, int, int, int]]


class DeniedMapReader:
    """One full read of the map by ``BPF_MAP_LOOKUP_BATCH`` (no deletion), into preallocated buffers."""

    def __init__(self, fd: int, layout: DeniedLayout, max_entries: int) -> None:
        self.fd = fd
        self.max_entries = max_entries
        self._key_size = layout.key_size
        self._value_size = layout.value_size
        key_struct, key_names = struct_for(layout.key_type)
        stats_struct, stats_names = struct_for(layout.leaf_type)
        missing = [n for n in _KEY_FIELDS if n not in key_names] + [n for n in _STATS_FIELDS if n not in stats_names]
        if missing:
            raise RuntimeError(f"bpf/flowtel.h fqdn_denied structs lack {missing}")
        self._stats_struct = stats_struct
        self._stats_index = tuple(stats_names.index(n) for n in _STATS_FIELDS)
        self._key_struct = key_struct
        self._key_index = tuple(key_names.index(n) for n in _KEY_FIELDS)
        self._keys = ctypes.create_string_buffer(self._key_size * max_entries)
        self._values = ctypes.create_string_buffer(self._value_size * max_entries)

    def read(self) -> dict[bytes, Stats]:
        """Every entry: raw key bytes -> (packets, bytes, first_ns, last_ns, last_sport, tcp_flags)."""
        from bcc.libbcc import lib  # the system's python3-bpfcc: imported late for unit tests

        ksz, vsz, n = self._key_size, self._value_size, self.max_entries
        in_batch = ctypes.c_uint32(0)
        out_batch = ctypes.c_uint32(0)
        count = ctypes.c_uint32(0)
        total = 0
        first = True
        while total < n:
            count.value = n - total
            res = lib.bpf_lookup_batch(self.fd, None if first else ctypes.byref(in_batch), ctypes.byref(out_batch),
                                       ctypes.byref(self._keys, ksz * total), ctypes.byref(self._values, vsz * total),
                                       ctypes.byref(count))
            err = ctypes.get_errno() or (-res if res < 0 else 0)
            total += count.value
            if res != 0:
                if err == errno.ENOENT:  # the end of the map
                    break
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH on {MAP_DENIED}: {os.strerror(err)}")
            in_batch.value = out_batch.value
            first = False
        keys = self._keys.raw
        values = memoryview(self._values.raw)[: vsz * total]
        idx = self._stats_index
        out: dict[bytes, Stats] = {}
        for i, v in enumerate(self._stats_struct.iter_unpack(values)):
            out[keys[i * ksz:(i + 1) * ksz]] = tuple(v[j] for j in idx)
        return out

    def decode_key(self, raw: bytes) -> tuple[str, str, int, int, int, int, int]:
        """(src_ip, dst_ip, ifindex, dport, family, protocol, verdict) of a raw key."""
        k = self._key_struct.unpack(raw)
        saddr, daddr, ifindex, dport, family, protocol, verdict = (k[i] for i in self._key_index)
        if family == 6:
            src, dst = socket.inet_ntop(socket.AF_INET6, saddr), socket.inet_ntop(socket.AF_INET6, daddr)
        else:
            src, dst = socket.inet_ntop(socket.AF_INET, saddr[:4]), socket.inet_ntop(socket.AF_INET, daddr[:4])
        return src, dst, ifindex, dport, family, protocol, verdict


class DeniedDiff:
    """Successive reads of one map → what was denied in between, and how many entries were evicted."""

    def __init__(self) -> None:
        self._prev: dict[bytes, Stats] = {}
        self._evicted_reported = 0

    def baseline(self, snapshot: dict[bytes, Stats], created: int) -> None:
        """Start from this read without reporting it (what a map held before the reader came)."""
        self._prev = snapshot
        self._evicted_reported = max(0, created - len(snapshot))

    def update(self, snapshot: dict[bytes, Stats], created: int, decode: KeyDecoder) -> DiffResult:
        """Deltas since the previous read. ``created`` is the map's insertion counter, read
        *before* ``snapshot``; ``decode`` turns a raw key into its fields."""
        prev = self._prev
        deltas: list[DeniedDelta] = []
        for raw, now in snapshot.items():
            before = prev.get(raw)
            if before is not None and before[2] == now[2]:  # same entry (same first_ns)
                packets, nbytes = now[0] - before[0], now[1] - before[1]
            else:  # new since the previous read, or evicted and created again
                packets, nbytes = now[0], now[1]
            if packets <= 0:
                continue
            src, dst, ifindex, dport, family, protocol, verdict = decode(raw)
            deltas.append(DeniedDelta(src, dst, ifindex, now[4], dport, family, protocol, verdict,
                                      packets, nbytes, now[2], now[3], now[5]))
        self._prev = snapshot
        # Entries only leave the map by eviction: created = live + evicted (at one instant).
        evicted_total = created - len(snapshot)
        evicted = max(0, evicted_total - self._evicted_reported)
        self._evicted_reported += evicted
        return DiffResult(deltas, evicted, len(snapshot))


def cpu_count_possible() -> int:
    """How many per-CPU slots a per-CPU map value has (the kernel's possible CPUs)."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


def header_layout() -> DeniedLayout:
    """The layouts of ``bpf/flowtel.h``'s ``fqdn_denied`` structs read from the header's text, for a
    process that reads the pinned map without loading bpf/fqdn_policy.c itself (the agent): no
    compile, so the agent's one bcc module stays its only LLVM run. The receiver still checks the
    sizes against the pinned map's own (a proxy built from another header is refused)."""
    return DeniedLayout(header_struct("fqdn_denied_key"), header_struct("fqdn_denied_stats"))
