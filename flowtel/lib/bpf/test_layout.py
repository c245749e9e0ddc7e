"""header_struct: the layouts read from bpf/flowtel.h's text equal the ones bcc compiles.

The agent reads the DNS proxy's pinned map through :func:`header_struct` so that it compiles
no second program; this checks, for every struct of the header the reader can lay out, every
member's offset and size and the struct's size against bcc's ctypes class of the same struct
(one compile of a probe program that declares a map of each)."""
from __future__ import annotations

import ctypes

import pytest

from flowtel.lib.bpf.constants import HEADER_PATH
from flowtel.lib.bpf.layout import _COMMENT, _STRUCT, header_struct, struct_for


def _header_structs() -> list[str]:
    return [m.group(1) for m in _STRUCT.finditer(_COMMENT.sub(" ", HEADER_PATH.read_text()))]


def _layout(ctype: type[ctypes.Structure]) -> list[tuple[str, int, int]]:
    # bcc spells out padding as __pad_* members; the header's own pad[] members stay.
    return [(f[0], getattr(ctype, f[0]).offset, getattr(ctype, f[0]).size) for f in ctype._fields_
            if not f[0].startswith("__pad_")]


def _readable() -> list[str]:
    out = []
    for name in _header_structs():
        try:
            header_struct(name)
        except TypeError:  # nested structs: only compiled programs read those
            continue
        out.append(name)
    return out


def test_the_denied_map_structs_and_most_others_are_readable() -> None:
    readable = _readable()
    assert {"fqdn_denied_key", "fqdn_denied_stats", "flow_key", "flow_stats"} <= set(readable)
    assert len(readable) >= 20


def test_unknown_members_raise_rather_than_guess() -> None:
    text = "struct a { __u32 x; struct b y; };\nstruct c { int z; };\n"
    with pytest.raises(TypeError, match="struct b y"):
        header_struct("a", text)
    with pytest.raises(TypeError, match="int z"):
        header_struct("c", text)
    with pytest.raises(LookupError):
        header_struct("nope", text)


def test_padding_follows_natural_alignment() -> None:
    cls = header_struct("t", "struct t { __u8 a; /* gap */ __u64 b; __u8 c[3]; __u16 d; };")
    assert _layout(cls) == [("a", 0, 1), ("b", 8, 8), ("c", 16, 3), ("d", 20, 2)]
    assert ctypes.sizeof(cls) == 24
    assert struct_for(cls)[0].size == 24


def test_struct_for_flattens_a_nested_struct_in_place() -> None:
    # As bpf/flowtel.h's struct flow_cache_entry holds a struct flow_key, and bcc spells it.
    inner = header_struct("k", "struct k { __u8 addr[4]; __u16 port; __u8 proto; __u8 pad[1]; };")
    outer = type("outer", (ctypes.Structure,), {"_fields_": [("hook", ctypes.c_uint8), ("key", inner),
                                                             ("packets", ctypes.c_uint64)]})
    layout, names = struct_for(outer)
    assert names == ("hook", "addr", "port", "proto", "pad", "packets")
    assert layout.size == ctypes.sizeof(outer) == 24  # key at 2 (its alignment), packets at 16
    value = outer(7, inner((ctypes.c_uint8 * 4)(10, 0, 0, 1), 53, 17), 12345)
    assert layout.unpack(bytes(value)) == (7, b"\x0a\x00\x00\x01", 53, 17, b"\x00", 12345)


@pytest.mark.kernel
def test_every_readable_struct_equals_bccs_compiled_layout() -> None:
    from bcc import BPF

    import bpf as bpf_sources

    names = _readable()
    text = '#include "flowtel.h"\n' + "".join(
        f"BPF_ARRAY(probe_{n}, struct {n}, 1);\n" for n in names)
    module = BPF(text=text.encode(), cflags=bpf_sources.cflags())  # bcc warns on str
    try:
        for n in names:
            compiled = module[f"probe_{n}".encode()].Leaf
            ours = header_struct(n)
            assert ctypes.sizeof(ours) == ctypes.sizeof(compiled), n
            assert _layout(ours) == _layout(compiled), n
    finally:
        module.cleanup()
