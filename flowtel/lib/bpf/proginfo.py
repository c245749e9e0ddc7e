"""What the kernel keeps about a loaded BPF program (``BPF_OBJ_GET_INFO_BY_FD``).

``recursion_misses``: the runs the kernel skipped. A classic tracepoint or kprobe program does
not run while any other such program runs on the same CPU (the kernel's global
``bpf_prog_active``): a softirq that fires ``sock:inet_sock_set_state`` while a tracing program
(flowtel's own, or any other tool's) runs in process context on that CPU is not seen by
flowtel's program at all. The kernel counts each skip per program (kernels ≥ 5.12); reading the
count makes that loss counted, not silent.
"""
from __future__ import annotations

import ctypes
import os
from typing import cast


class _ProgInfo(ctypes.Structure):
    # struct bpf_prog_info (include/uapi/linux/bpf.h) up to recursion_misses; the kernel fills
    # as much of it as the size given says, so later members need not be declared.
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64), ("recursion_misses", ctypes.c_uint64),
    ]


def _lib() -> ctypes.CDLL:
    from bcc.libbcc import lib  # the system's python3-bpfcc

    lib.bpf_obj_get_info.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_obj_get_info.restype = ctypes.c_int
    return cast(ctypes.CDLL, lib)


def prog_info(fd: int) -> tuple[int, str, int]:
    """(id, name, recursion_misses) of the program ``fd`` refers to."""
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if _lib().bpf_obj_get_info(fd, ctypes.byref(info), ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_OBJ_GET_INFO_BY_FD: {os.strerror(err)}")
    return int(info.id), info.name.decode(errors="replace"), int(info.recursion_misses)


def recursion_misses(fd: int) -> int:
    """Runs of the program ``fd`` the kernel skipped since it was loaded (0 before 5.12)."""
    return prog_info(fd)[2]
