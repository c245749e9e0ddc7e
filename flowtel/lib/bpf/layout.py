"""Binary layouts of the structs in ``bpf/flowtel.h``, derived from bcc's ctypes classes.

bcc builds ctypes classes for map keys and values from the C header; unpacking thousands
of entries through ctypes attribute access is slow, so this derives a ``struct.Struct``
from the class's own field offsets. There is no second hand-kept copy of any layout.
"""
from __future__ import annotations

import ctypes
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

    Byte arrays (``__u8 x[N]``) become one ``bytes`` item; padding between fields is
    taken from the real offsets, so the result is exact for any layout bcc produced.
    """
    fmt = ["="]
    names: list[str] = []
    pos = 0
    for name, ftype in ctype._fields_:  # type: ignore[attr-defined]
        offset = getattr(ctype, name).offset
        if offset > pos:
            fmt.append(f"{offset - pos}x")
        size = ctypes.sizeof(ftype)
        if issubclass(ftype, ctypes.Array):
            elem = ftype._type_  # type: ignore[attr-defined]
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
    s = struct.Struct("".join(fmt))
    if s.size != total:
        raise TypeError(f"{ctype.__name__}: derived size {s.size} != ctypes size {total}")
    return s, tuple(names)
