"""Binary layouts of the structs in ``bpf/flowtel.h``, derived from bcc's ctypes classes, or
read from the header's text where a process compiles no program of its own (:func:`header_struct`).

bcc builds ctypes classes for map keys and values from the C header; unpacking thousands
of entries through ctypes attribute access is slow, so this derives a ``struct.Struct``
from the class's own field offsets. There is no second hand-kept copy of any layout.
"""
from __future__ import annotations

import ctypes
import re
import struct

_CODES = {
    ctypes.c_uint8: "B",
    ctypes.c_int8: "b",
    ctypes.c_uint16: "H",
    ctypes.c_int16: "h",
    ctypes.c_uint32: "I",
    ctypes.c_int32: "i",
    ctypes.c_uint64: "Q",
    ctypes.c_int64: "q",
    ctypes.c_ulong: "Q" if ctypes.sizeof(ctypes.c_ulong) == 8 else "I",
    ctypes.c_long: "q" if ctypes.sizeof(ctypes.c_long) == 8 else "i",
    ctypes.c_ulonglong: "Q",
    ctypes.c_longlong: "q",
    ctypes.c_ubyte: "B",
    ctypes.c_byte: "b",
    ctypes.c_ushort: "H",
    ctypes.c_short: "h",
    ctypes.c_uint: "I",
    ctypes.c_int: "i",
    ctypes.c_char: "c",
}


def struct_for(ctype: type[ctypes.Structure]) -> tuple[struct.Struct, tuple[str, ...]]:
    """A native-endian ``struct.Struct`` with one item per field, and the field names.

    Byte arrays (``__u8 x[N]``) become one ``bytes`` item; a nested struct's fields are items
    of their own, in place (named as in the nested struct); padding between fields is taken from
    the real offsets, so the result is exact for any layout bcc produced.
    """
    fmt = ["="]
    names: list[str] = []
    _flatten(ctype, fmt, names)
    s = struct.Struct("".join(fmt))
    if s.size != ctypes.sizeof(ctype):
        raise TypeError(f"{ctype.__name__}: derived size {s.size} != ctypes size {ctypes.sizeof(ctype)}")
    return s, tuple(names)


def _flatten(ctype: type[ctypes.Structure], fmt: list[str], names: list[str]) -> None:
    """Appends the format items and names of ``ctype``'s fields (its whole size, padding included)."""
    pos = 0
    for field in ctype._fields_:
        name, ftype = field[0], field[1]  # (name, type) or (name, type, bit width)
        offset = getattr(ctype, name).offset
        if offset > pos:
            fmt.append(f"{offset - pos}x")
        size = ctypes.sizeof(ftype)
        if issubclass(ftype, ctypes.Structure):
            _flatten(ftype, fmt, names)
            pos = offset + size
            continue
        if issubclass(ftype, ctypes.Array):
            elem = getattr(ftype, "_type_")  # an Array's element type; ctypes' stubs do not narrow by issubclass
            if ctypes.sizeof(elem) != 1:
                raise TypeError(f"{ctype.__name__}.{name}: only byte arrays are supported")
            fmt.append(f"{size}s")
        else:
            code = next((c for t, c in _CODES.items() if ftype is t), None)
            if code is None:
                raise TypeError(f"{ctype.__name__}.{name}: unsupported field type {ftype!r}")
            fmt.append(code)
        names.append(name)
        pos = offset + size
    total = ctypes.sizeof(ctype)
    if total > pos:
        fmt.append(f"{total - pos}x")


# The UAPI integer types the header's structs use, as ctypes types (natural alignment, as clang
# lays them out for the BPF target on every architecture flowtel supports: x86-64, arm64).
_HEADER_TYPES: dict[str, type[ctypes._SimpleCData[int]]] = {
    "__u8": ctypes.c_uint8, "__s8": ctypes.c_int8,
    "__u16": ctypes.c_uint16, "__s16": ctypes.c_int16,
    "__u32": ctypes.c_uint32, "__s32": ctypes.c_int32,
    "__u64": ctypes.c_uint64, "__s64": ctypes.c_int64,
}
_STRUCT = re.compile(r"\bstruct\s+([A-Za-z_]\w*)\s*\{([^{}]*)\}\s*;")
_MEMBER = re.compile(r"^\s*([A-Za-z_]\w*)\s+([A-Za-z_]\w*)\s*(?:\[\s*([A-Za-z0-9_]+)\s*\])?\s*$")
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def header_struct(name: str, text: str | None = None) -> type[ctypes.Structure]:
    """The ctypes class of ``struct <name>`` of ``bpf/flowtel.h``, read from the header's text.

    For a process that reads a map some other process created (the agent reading the DNS
    proxy's pinned ``fqdn_denied``): bcc would give the same class, but only by compiling a
    program, i.e. a second LLVM run and its memory in the agent. Only structs of the UAPI
    integer types and arrays of them (sized by a literal or a ``FLOWTEL_*`` constant) are
    understood; anything else raises, rather than guess. ``test_layout.py`` checks the result
    against bcc's own classes for every struct of the header this reads.
    """
    from flowtel.lib.bpf.constants import HEADER, HEADER_PATH

    source = _COMMENT.sub(" ", HEADER_PATH.read_text() if text is None else text)
    body = next((m.group(2) for m in _STRUCT.finditer(source) if m.group(1) == name), None)
    if body is None:
        raise LookupError(f"bpf/flowtel.h has no plain struct {name}")
    fields: list[tuple[str, type[ctypes._SimpleCData[int]] | type[ctypes.Array[ctypes._SimpleCData[int]]]]] = []
    for decl in filter(str.strip, body.split(";")):
        m = _MEMBER.match(decl)
        ctype = _HEADER_TYPES.get(m.group(1)) if m else None
        if m is None or ctype is None:
            raise TypeError(f"struct {name}: cannot lay out member {decl.strip()!r} without a compiler")
        count = m.group(3)
        if count is None:
            fields.append((m.group(2), ctype))
        else:
            n = int(count, 0) if count[0].isdigit() else int(getattr(HEADER, count.removeprefix("FLOWTEL_")))
            fields.append((m.group(2), ctype * n))
    return type(name, (ctypes.Structure,), {"_fields_": fields})
