"""BPF_PROG_TEST_RUN of a SCHED_CLS program through libbpf (``bpf_prog_test_run_opts``): the
agent's DNS expiry sweep (receiver/ebpf/dnsmaps.py), the kernel tests and bench.bpf_runtime
all run programs this way; one definition of libbpf's options struct for all of them."""
from __future__ import annotations

import ctypes
import functools
import os
import struct
from dataclasses import dataclass
from typing import Any


class ProgTestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (libbpf 1.x)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


@dataclass(frozen=True, slots=True)
class ProgTestRun:
    retval: int  # the program's return value (of the last run)
    duration_ns: int  # mean ns per run, as the kernel measured it


@functools.cache
def _entry() -> Any:  # a ctypes function pointer (untyped)
    from bcc.libbcc import lib

    # A handle of its own on bcc's library: the argument types set here are then not shared
    # with (or overwritten by) other users of bcc's ``lib``.
    fn = ctypes.CDLL(lib._name, use_errno=True).bpf_prog_test_run_opts
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(ProgTestRunOpts)]
    return fn


# struct __sk_buff up to and including ifindex (UAPI: len, pkt_type, mark, queue_mapping,
# protocol, vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex, ifindex): the part
# of a test run's context this module sets; the kernel zeroes the rest.
_SKB_CTX = struct.Struct("=11I")


def prog_test_run(prog_fd: int, frame: bytes, repeat: int = 1, *, ifindex: int = 0,
                  ingress_ifindex: int = 0) -> ProgTestRun:
    """Run the program ``repeat`` times on ``frame`` (a SCHED_CLS test run needs at least an
    Ethernet header's bytes); OSError if the kernel refuses. ``ifindex`` (an existing link;
    0: loopback) and ``ingress_ifindex`` are the skb's, as the program reads them."""
    buf = ctypes.create_string_buffer(frame, len(frame))
    out = ctypes.create_string_buffer(len(frame) + 256)
    opts = ProgTestRunOpts(sz=ctypes.sizeof(ProgTestRunOpts), data_in=ctypes.addressof(buf),
                           data_size_in=len(frame), data_out=ctypes.addressof(out), data_size_out=len(out),
                           repeat=repeat)
    if ifindex or ingress_ifindex:
        ctx = ctypes.create_string_buffer(_SKB_CTX.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, ingress_ifindex, ifindex),
                                          _SKB_CTX.size)
        opts.ctx_in = ctypes.addressof(ctx)
        opts.ctx_size_in = _SKB_CTX.size
    if _entry()(prog_fd, ctypes.byref(opts)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return ProgTestRun(int(opts.retval), int(opts.duration))
