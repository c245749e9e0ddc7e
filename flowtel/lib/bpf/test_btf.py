"""Member offsets from BTF: the walker on small synthetic types, then on this kernel's BTF.

The kernel checks are consistency checks a reader can verify against the kernel source (and
pahole): members that the source declares next to each other are adjacent, sizes are what the
types say, and everything lies inside the struct.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from flowtel.lib.bpf import btf as btf_mod

# struct outer { int a; union { struct { char pad[3]; unsigned short x; }; long y; }; int z:4; possible_t p; }
SYNTHETIC = {
    "types": [
        {"id": 1, "kind": "INT", "name": "int", "size": 4, "bits_offset": 0, "nr_bits": 32, "encoding": "SIGNED"},
        {"id": 2, "kind": "INT", "name": "unsigned short", "size": 2, "bits_offset": 0, "nr_bits": 16, "encoding": "(none)"},
        {"id": 3, "kind": "INT", "name": "long", "size": 8, "bits_offset": 0, "nr_bits": 64, "encoding": "SIGNED"},
        {"id": 4, "kind": "ARRAY", "name": "(anon)", "type_id": 9, "index_type_id": 1, "nr_elems": 3},
        {"id": 5, "kind": "STRUCT", "name": "(anon)", "size": 6, "vlen": 2, "members": [
            {"name": "pad", "type_id": 4, "bits_offset": 0},
            {"name": "x", "type_id": 11, "bits_offset": 32}]},
        {"id": 6, "kind": "UNION", "name": "(anon)", "size": 8, "vlen": 2, "members": [
            {"name": "(anon)", "type_id": 5, "bits_offset": 0},
            {"name": "y", "type_id": 3, "bits_offset": 0}]},
        {"id": 7, "kind": "STRUCT", "name": "outer", "size": 32, "vlen": 4, "members": [
            {"name": "a", "type_id": 1, "bits_offset": 0},
            {"name": "(anon)", "type_id": 6, "bits_offset": 64},
            {"name": "z", "type_id": 1, "bits_offset": 128, "bitfield_size": 4},
            {"name": "p", "type_id": 13, "bits_offset": 192}]},
        {"id": 8, "kind": "STRUCT", "name": "outer", "size": 0, "vlen": 0, "members": []},  # a forward twin
        {"id": 9, "kind": "INT", "name": "char", "size": 1, "bits_offset": 0, "nr_bits": 8, "encoding": "(none)"},
        {"id": 10, "kind": "PTR", "name": "(anon)", "type_id": 7},
        {"id": 11, "kind": "CONST", "name": "(anon)", "type_id": 12},
        {"id": 12, "kind": "TYPEDEF", "name": "u16", "type_id": 2},
        {"id": 13, "kind": "TYPEDEF", "name": "possible_t", "type_id": 14},
        {"id": 14, "kind": "STRUCT", "name": "(anon)", "size": 8, "vlen": 1, "members": [
            {"name": "ptr", "type_id": 10, "bits_offset": 0}]},
    ]
}


@pytest.fixture(scope="module")
def synthetic() -> btf_mod.Btf:
    return btf_mod.Btf.from_json(json.dumps(SYNTHETIC))


def test_walks_anonymous_unions_and_structs(synthetic: btf_mod.Btf) -> None:
    x = synthetic.member("outer.x")
    assert (x.bits_offset, x.size, x.kind) == (64 + 32, 2, "INT")  # through CONST and TYPEDEF
    assert synthetic.offset("outer.x", 2) == 12
    assert synthetic.offset("outer.y") == 8
    assert synthetic.offset("outer.pad") == 8 and synthetic.member("outer.pad").size == 3


def test_nested_path_through_a_typedef_struct(synthetic: btf_mod.Btf) -> None:
    ptr = synthetic.member("outer.p.ptr")
    assert (ptr.offset, ptr.size, ptr.kind) == (24, 8, "PTR")


def test_bitfields_and_wrong_sizes_are_refused(synthetic: btf_mod.Btf) -> None:
    z = synthetic.member("outer.z")
    assert z.bitfield_size == 4
    with pytest.raises(btf_mod.BtfError, match="bitfield"):
        _ = z.offset
    with pytest.raises(btf_mod.BtfError, match="is 2 bytes on this kernel; flowtel reads it as 4"):
        synthetic.offset("outer.x", 4)


def test_missing_names_are_errors(synthetic: btf_mod.Btf) -> None:
    with pytest.raises(btf_mod.BtfError, match="has no member 'nope'"):
        synthetic.member("outer.nope")
    with pytest.raises(btf_mod.BtfError, match="no struct or union named 'inner'"):
        synthetic.member("inner.x")
    with pytest.raises(btf_mod.BtfError, match="is a INT, not a struct"):
        synthetic.member("outer.a.b")
    assert synthetic.struct_size("outer") == 32  # the complete definition, not the forward twin


def _kernel_btf_available() -> bool:
    return os.path.exists(btf_mod.VMLINUX) and bool(
        shutil.which("bpftool") or os.access("/usr/sbin/bpftool", os.X_OK)
    )


@pytest.fixture(scope="module")
def kernel() -> btf_mod.Btf:
    if not _kernel_btf_available():
        pytest.skip("needs /sys/kernel/btf/vmlinux and bpftool")
    return btf_mod.load()


def test_kernel_sk_buff_members(kernel: btf_mod.Btf) -> None:
    size = kernel.struct_size("sk_buff")
    # include/linux/skbuff.h: "sk_buff_data_t tail; sk_buff_data_t end; unsigned char *head, *data;"
    tail, end = kernel.member("sk_buff.tail"), kernel.member("sk_buff.end")
    head, data = kernel.member("sk_buff.head"), kernel.member("sk_buff.data")
    assert tail.size == end.size == 4 and end.offset == tail.offset + 4  # offsets, on 64-bit
    assert head.offset == end.offset + 4 and data.offset == head.offset + 8
    assert head.kind == "PTR" and head.size == 8
    # "__u16 transport_header; __u16 network_header; __u16 mac_header;"
    th = kernel.offset("sk_buff.transport_header", 2)
    assert kernel.offset("sk_buff.network_header", 2) == th + 2
    assert kernel.offset("sk_buff.mac_header", 2) == th + 4
    # "unsigned int len, data_len;"
    assert kernel.offset("sk_buff.data_len", 4) == kernel.offset("sk_buff.len", 4) + 4
    # dev sits in an anonymous union inside an anonymous struct inside an anonymous union.
    assert kernel.member("sk_buff.dev").kind == "PTR"
    assert kernel.offset("sk_buff.dev_scratch") == kernel.offset("sk_buff.dev")
    assert kernel.member("sk_buff.cb").size == 48
    for path in ("sk_buff.len", "sk_buff.skb_iif", "sk_buff.head", "sk_buff.network_header"):
        m = kernel.member(path)
        assert 0 <= m.offset and m.offset + m.size <= size, path
    assert kernel.member("sk_buff.pkt_type").bitfield_size == 3


def test_kernel_offsets_the_programs_use(kernel: btf_mod.Btf) -> None:
    from receiver.ebpf.kernel_events import program

    for name, (path, width) in {**program._DROP_OFFSETS, **program._TCP_OFFSETS}.items():
        offset = kernel.offset(path, width)
        assert offset >= 0, name
    # possible_net_t is a one-member struct: its only member is at its start.
    assert kernel.offset("net_device.nd_net.net", 8) == kernel.offset("net_device.nd_net")
    # tcp_skb_cb must fit sk_buff.cb, where the kernel keeps it.
    assert kernel.struct_size("tcp_skb_cb") <= kernel.member("sk_buff.cb").size
