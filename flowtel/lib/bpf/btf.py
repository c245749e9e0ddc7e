"""Kernel struct member offsets from the running kernel's BTF.

A program that reads a kernel struct (``sk_buff``, ``net_device``) must use the layout of the
kernel it runs on, not of whatever headers compiled it. The kernel describes its own types
in ``/sys/kernel/btf/vmlinux``; ``bpftool -j btf dump … format raw`` prints them, one JSON
object per type. This module runs bpftool once, then answers "where is ``sk_buff.len``" by
walking members, looking inside anonymous structs and unions (where the kernel keeps most
of ``sk_buff``) as C name lookup does. Offsets are handed to the program as ``-D`` constants.

:func:`load` does the I/O; :class:`Btf` is pure and can be built from any bpftool output.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Iterable

VMLINUX = "/sys/kernel/btf/vmlinux"
_QUALIFIERS = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}
_ANON = "(anon)"


class BtfError(RuntimeError):
    """BTF is missing or does not describe what flowtel needs; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Member:
    """Where a (possibly nested) member lives, relative to the start of the outer struct."""

    path: str
    bits_offset: int
    bitfield_size: int  # 0 unless a bitfield
    size: int  # bytes of the member's type (for a bitfield: of its storage type)
    kind: str  # resolved kind of the member's type: INT, PTR, STRUCT, ARRAY, ENUM, …

    @property
    def offset(self) -> int:
        """Byte offset; a :class:`BtfError` for members that are not byte-addressable."""
        if self.bitfield_size or self.bits_offset % 8:
            raise BtfError(f"{self.path} is a bitfield (bit {self.bits_offset}), not byte-addressable")
        return self.bits_offset // 8


class Btf:
    """Named structs and unions of one BTF object, with member lookup."""

    def __init__(self, types: Iterable[dict[str, Any]]) -> None:
        self._types: dict[int, dict[str, Any]] = {}
        self._named: dict[str, dict[str, Any]] = {}
        for t in types:
            self._types[t["id"]] = t
            if t["kind"] in ("STRUCT", "UNION") and t.get("name", _ANON) != _ANON:
                # Keep the complete definition if a forward-declared twin shares the name.
                prev = self._named.get(t["name"])
                if prev is None or t.get("vlen", 0) > prev.get("vlen", 0):
                    self._named[t["name"]] = t

    @classmethod
    def from_json(cls, text: str | bytes) -> Btf:
        data = json.loads(text)
        types = data["types"] if isinstance(data, dict) else data
        return cls(types)

    def _resolve(self, type_id: int) -> dict[str, Any]:
        t = self._types[type_id]
        for _ in range(32):  # qualifier chains are short; a cycle would be corrupt BTF
            if t["kind"] not in _QUALIFIERS:
                return t
            t = self._types[t["type_id"]]
        raise BtfError(f"type {type_id}: qualifier chain too long")

    def _size(self, t: dict[str, Any]) -> int:
        kind = t["kind"]
        if kind == "PTR":
            return 8  # BTF has no pointer size; flowtel's programs run on 64-bit kernels
        if kind == "ARRAY":
            return self._size(self._resolve(t["type_id"])) * int(t["nr_elems"])
        return int(t.get("size", 0))

    def _find(self, struct: dict[str, Any], name: str, base: int) -> tuple[dict[str, Any], int] | None:
        """The member named ``name`` and its bit offset, searching anonymous members too."""
        anonymous = []
        for m in struct.get("members", []):
            if m["name"] == name:
                return m, base + m["bits_offset"]
            if m["name"] == _ANON:
                anonymous.append(m)
        for m in anonymous:
            inner = self._resolve(m["type_id"])
            if inner["kind"] in ("STRUCT", "UNION"):
                found = self._find(inner, name, base + m["bits_offset"])
                if found is not None:
                    return found
        return None

    def struct_size(self, name: str) -> int:
        t = self._named.get(name)
        if t is None:
            raise BtfError(f"kernel BTF has no struct or union named {name!r}")
        return int(t["size"])

    def member(self, path: str) -> Member:
        """``"sk_buff.len"``, or nested through embedded structs: ``"net_device.nd_net.net"``."""
        root, *names = path.split(".")
        if not names:
            raise BtfError(f"{path!r}: expected STRUCT.MEMBER[.MEMBER…]")
        t = self._named.get(root)
        if t is None:
            raise BtfError(f"kernel BTF has no struct or union named {root!r}")
        bits = 0
        found: dict[str, Any] | None = None
        resolved = t
        for i, name in enumerate(names):
            if resolved["kind"] not in ("STRUCT", "UNION"):
                raise BtfError(f"{'.'.join([root, *names[:i]])} is a {resolved['kind']}, not a struct")
            hit = self._find(resolved, name, bits)
            if hit is None:
                raise BtfError(f"kernel BTF: {'.'.join([root, *names[:i]])} has no member {name!r}")
            found, bits = hit
            resolved = self._resolve(found["type_id"])
        assert found is not None
        return Member(
            path=path,
            bits_offset=bits,
            bitfield_size=int(found.get("bitfield_size", 0)),
            size=self._size(resolved),
            kind=resolved["kind"],
        )

    def offset(self, path: str, size: int | None = None) -> int:
        """Byte offset of a member; with ``size``, also checks the member is that many bytes,
        so a program that reads it as a fixed-width integer reads all of it and nothing more."""
        m = self.member(path)
        if size is not None and m.size != size:
            raise BtfError(f"{path} is {m.size} bytes on this kernel; flowtel reads it as {size}")
        return m.offset


def load(vmlinux: str = VMLINUX, bpftool: str | None = None) -> Btf:
    """Run bpftool once over the kernel's BTF."""
    if not os.path.exists(vmlinux):
        raise BtfError(
            f"{vmlinux} is missing: the kernel was built without CONFIG_DEBUG_INFO_BTF; "
            "flowtel needs BTF to find sk_buff fields (use a distribution kernel, which has it)"
        )
    tool = bpftool or shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if os.access(p, os.X_OK)), None
    )
    if tool is None:
        raise BtfError("bpftool not found; install it (`apt-get install bpftool`)")
    proc = subprocess.run(
        [tool, "-j", "btf", "dump", "file", vmlinux, "format", "raw"],
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise BtfError(f"bpftool btf dump of {vmlinux} failed: {proc.stderr.decode(errors='replace').strip()}")
    return Btf.from_json(proc.stdout)
