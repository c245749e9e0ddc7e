"""Opening the dnsproxy's pinned maps by path (``BPF_OBJ_GET``) and telling one map from another.

The proxy may start before or after the agent, restart (same pinned maps: the program is
recompiled over them), or be uninstalled and installed again (new maps under the same paths).
A map's kernel id says which case it is: the same id is the same map, a new id a new map.
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
# UAPI BPF_F_RDONLY (BPF_OBJ_GET file_flags): the fd can look up, never update or delete.
BPF_F_RDONLY = 1 << 3


class _ObjGetOpts(ctypes.Structure):
    """libbpf's ``struct bpf_obj_get_opts`` as of libbpf 1.0 (``sz``, ``file_flags``)."""

    _fields_ = [("sz", ctypes.c_size_t), ("file_flags", ctypes.c_uint32)]


class _MapInfo(ctypes.Structure):
    """The leading members of UAPI ``struct bpf_map_info`` (the kernel fills what fits)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


@dataclass(frozen=True, slots=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int


class MapMismatch(RuntimeError):
    """The pinned map is not what this build's bpf/flowtel.h describes (proxy and agent differ)."""


def _lib() -> ctypes.CDLL:
    from bcc.libbcc import lib  # the system's python3-bpfcc (its libbpf resolves bpf_obj_get)

    lib.bpf_obj_get_opts.argtypes = [ctypes.c_char_p, ctypes.POINTER(_ObjGetOpts)]
    lib.bpf_obj_get_opts.restype = ctypes.c_int
    lib.bpf_obj_get_info.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_obj_get_info.restype = ctypes.c_int
    return lib


def open_pinned(path: str) -> int | None:
    """A new read-only fd of the map pinned at ``path``, or None when nothing is pinned there.

    Read-only: the agent only reads the proxy's maps, so a bug (or an attacker in the
    agent) cannot change the policy's allow-list through these fds; the kernel refuses
    updates and deletes on them (EPERM)."""
    lib = _lib()
    opts = _ObjGetOpts(ctypes.sizeof(_ObjGetOpts), BPF_F_RDONLY)
    fd = lib.bpf_obj_get_opts(path.encode(), ctypes.byref(opts))
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno() or -fd
    if err in (errno.ENOENT, errno.ENOTDIR):
        return None
    raise OSError(err, f"BPF_OBJ_GET {path}: {os.strerror(err)}")


def map_info(fd: int) -> MapInfo:
    lib = _lib()
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if lib.bpf_obj_get_info(fd, ctypes.byref(info), ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_OBJ_GET_INFO_BY_FD: {os.strerror(err)}")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries)


def check(info: MapInfo, path: str, map_type: int, key_size: int, value_size: int) -> None:
    """Raise :class:`MapMismatch` unless the map has the type and sizes this build expects."""
    if (info.type, info.key_size, info.value_size) != (map_type, key_size, value_size):
        raise MapMismatch(
            f"{path} is a map of type {info.type} with {info.key_size}-byte keys and {info.value_size}-byte "
            f"values; this agent's bpf/flowtel.h expects type {map_type}, {key_size} and {value_size}: "
            "run the dnsproxy and the agent from the same flowtel version")


def read_percpu_u64(fd: int, index: int, ncpus: int) -> int:
    """The sum over CPUs of one slot of a per-CPU array of ``__u64``."""
    lib = _lib()
    key = ctypes.c_uint32(index)
    values = (ctypes.c_uint64 * ncpus)()
    if lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(values)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"lookup of per-CPU slot {index}: {os.strerror(err)}")
    return int(sum(values))
