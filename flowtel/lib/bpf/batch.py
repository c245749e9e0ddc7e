"""Whole-map reads in a few syscalls: ``BPF_MAP_LOOKUP_BATCH`` and ``..._AND_DELETE_BATCH``.

bcc's table iteration costs a syscall and ctypes objects per entry; these fill caller-owned
arrays of the map's key and value ctypes types (allocated once, so a drain churns no memory)
and return how many entries were read.
"""
from __future__ import annotations

import ctypes
import errno
import os
from typing import Any


def _lib() -> Any:
    from bcc.libbcc import lib  # the system's python3-bpfcc; imported late for unit tests

    return lib


def read_batch(fd: int, keys: Any, key_size: int, values: Any, value_size: int, max_entries: int, *,
               delete: bool, name: str = "map") -> int:
    """Up to ``max_entries`` entries of the map ``fd`` into the buffers ``keys``/``values``
    (ctypes arrays or string buffers of ``max_entries`` keys and values; for a per-CPU map a
    value is ``round_up(value_size, 8) * possible CPUs`` bytes). With ``delete`` entries are
    removed as they are read. Returns the count; raises OSError naming the map on failure."""
    lib = _lib()
    call = lib.bpf_lookup_and_delete_batch if delete else lib.bpf_lookup_batch
    # The position token: a u32 bucket (hash maps) or key (arrays with __u32 keys, all of ours).
    in_batch = ctypes.c_uint32(0)
    out_batch = ctypes.c_uint32(0)
    count = ctypes.c_uint32(0)
    total = 0
    first = True
    while total < max_entries:
        count.value = max_entries - total
        res = call(fd, None if first else ctypes.byref(in_batch), ctypes.byref(out_batch),
                   ctypes.byref(keys, key_size * total), ctypes.byref(values, value_size * total),
                   ctypes.byref(count))
        err = ctypes.get_errno() or (-res if res < 0 else 0)
        total += count.value
        if res != 0:
            if err == errno.ENOENT:  # the end of the map
                break
            op = "BPF_MAP_LOOKUP_AND_DELETE_BATCH" if delete else "BPF_MAP_LOOKUP_BATCH"
            raise OSError(err, f"{op} on {name}: {os.strerror(err)}")
        in_batch.value = out_batch.value
        first = False
    return total


def percpu_u64_sums(table: Any, indexes: range | list[int]) -> list[int]:
    """Sums over CPUs of a per-CPU array of ``__u64`` at ``indexes`` (bcc's table)."""
    return [int(table.sum(ctypes.c_int(i)).value) for i in indexes]
