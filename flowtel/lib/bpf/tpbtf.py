"""BTF-enabled raw tracepoints (``tp_btf``) for programs compiled by bcc.

A classic tracepoint program (``attach_tracepoint``) runs after the kernel has built the
event's perf record (a per-CPU buffer, the caller's registers, every field of the record
copied), work ``bpf_stats`` does not show and that the program pays whether it reads one
field or all. A ``tp_btf`` program is called with the tracepoint's own arguments (a
``struct sock *``, an ``sk_buff *``) typed by the kernel's BTF, so it reads the members it
needs with plain loads, which the verifier checks against BTF and the JIT turns into loads
with a fault handler: no record, no helper call per member.

bcc 0.26 compiles such a program (a function taking ``__u64 *ctx``: ``ctx[i]`` is the
tracepoint's argument i) but cannot load it: its loader looks the attach target up as a BTF
function, where ``tp_btf`` needs the ``btf_trace_<event>`` typedef. So :func:`attach` loads the
instructions bcc produced (map references already resolved to descriptors) with
``BPF_PROG_LOAD`` itself and attaches them with ``BPF_RAW_TRACEPOINT_OPEN``.
"""
from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from typing import Any

from flowtel.lib.bpf.btf import Btf, BtfError

_NR_BPF = 321  # x86_64; the kernel-event programs need BTF trampolines, which exist on x86_64
_BPF_PROG_LOAD = 5
_BPF_RAW_TRACEPOINT_OPEN = 17
_BPF_PROG_TYPE_TRACING = 26
_BPF_TRACE_RAW_TP = 23
# union bpf_attr for BPF_PROG_LOAD (UAPI, stable): what this loader sets, by byte offset.
_ATTR_BYTES = 128
_LOG_BYTES = 1 << 20


class TpBtfError(OSError):
    """The kernel refused to load or attach a tp_btf program; the verifier's log included."""


def typedef_id(btf: Btf, event: str) -> int:
    """The BTF id the kernel attaches a tp_btf program of ``event`` by (``btf_trace_<event>``)."""
    type_id = btf.type_id(f"btf_trace_{event}", "TYPEDEF")
    if type_id is None:
        raise BtfError(f"kernel BTF has no btf_trace_{event}: the kernel cannot attach a BTF tracepoint "
                       f"program to {event} (it needs a kernel ≥ 5.5 built with CONFIG_DEBUG_INFO_BTF)")
    return type_id


@dataclass(slots=True)
class Attached:
    """One loaded and attached tp_btf program: closing both descriptors detaches it."""

    event: str
    prog_fd: int
    link_fd: int

    def detach(self) -> None:
        for fd in (self.link_fd, self.prog_fd):
            if fd >= 0:
                os.close(fd)
        self.link_fd = self.prog_fd = -1


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(_NR_BPF, cmd, attr, len(attr)))


def attach(b: Any, fn_name: str, event: str, attach_btf_id: int) -> Attached:
    """Load function ``fn_name`` of bcc module ``b`` as a tp_btf program of ``event`` (the
    kernel's name for the program is ``fn_name``, cut to 15 characters) and attach it."""
    from bcc import lib

    name = fn_name.encode()
    start = lib.bpf_function_start(b.module, name)
    if not start:
        raise TpBtfError(f"bcc module has no function {fn_name}")
    size = lib.bpf_function_size(b.module, name)
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(_LOG_BYTES)
    attr = ctypes.create_string_buffer(_ATTR_BYTES)
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version, prog_flags
    struct.pack_into("=IIQQIIQII", attr, 0, _BPF_PROG_TYPE_TRACING, size // 8, ctypes.cast(start, ctypes.c_void_p).value,
                     ctypes.addressof(license), 1, _LOG_BYTES, ctypes.addressof(log), 0, 0)
    struct.pack_into("=16s", attr, 48, name[:15])
    struct.pack_into("=I", attr, 68, _BPF_TRACE_RAW_TP)     # expected_attach_type
    struct.pack_into("=I", attr, 108, attach_btf_id)        # attach_btf_id (in vmlinux: obj fd 0)
    prog_fd = _bpf(_BPF_PROG_LOAD, attr)
    if prog_fd < 0:
        err = ctypes.get_errno()
        raise TpBtfError(err, f"cannot load {fn_name} as a BTF tracepoint program of {event}: "
                              f"{os.strerror(err)}\n{log.value.decode(errors='replace')[-4000:]}")
    open_attr = ctypes.create_string_buffer(16)
    struct.pack_into("=QI", open_attr, 0, 0, prog_fd)  # name NULL: the target is the program's BTF id
    link_fd = _bpf(_BPF_RAW_TRACEPOINT_OPEN, open_attr)
    if link_fd < 0:
        err = ctypes.get_errno()
        os.close(prog_fd)
        raise TpBtfError(err, f"cannot attach {fn_name} to {event}: {os.strerror(err)}")
    return Attached(event, prog_fd, link_fd)
