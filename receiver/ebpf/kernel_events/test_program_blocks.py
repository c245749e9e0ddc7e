"""The loader's block reads (sk_buff / net_device members read in one go) and the drop-reason array,
against this kernel's BTF and tracefs as well as made-up layouts."""
from __future__ import annotations

import pytest

from flowtel.lib.bpf import btf as btf_mod
from receiver.ebpf.kernel_events import KernelEventsConfig, program


def test_a_block_covers_every_member_it_names() -> None:
    offsets = {"FLOWTEL_OFF_SKB_DEV": 16, "FLOWTEL_OFF_SKB_SK": 24, "FLOWTEL_OFF_SKB_LEN": 112,
               "FLOWTEL_OFF_SKB_IIF": 144, "FLOWTEL_OFF_SKB_NETWORK_HEADER": 180, "FLOWTEL_OFF_SKB_HEAD": 192}
    block = program.read_block(offsets, program._SKB_BLOCK, "B")
    # From dev (16) to the end of head (192 + 8), a multiple of 8.
    assert block == {"B_OFF": 16, "B_LEN": 184}
    sizes = {name: program._DROP_OFFSETS[name][1] or 0 for name in program._SKB_BLOCK}
    assert all(block["B_OFF"] <= offsets[m] and offsets[m] + sizes[m] <= block["B_OFF"] + block["B_LEN"]
               for m in program._SKB_BLOCK)


def test_a_layout_too_spread_out_for_the_stack_is_refused() -> None:
    offsets = {"FLOWTEL_OFF_NETDEV_IFINDEX": 224, "FLOWTEL_OFF_NETDEV_NET": 224 + program.MAX_BLOCK_BYTES}
    with pytest.raises(btf_mod.BtfError, match="span"):
        program.read_block(offsets, program._NETDEV_BLOCK, "FLOWTEL_NETDEV_BLOCK")


def test_this_kernel_fits_and_the_array_takes_its_own_reasons_only() -> None:
    facts = program.read_kernel_facts(KernelEventsConfig())  # raises if this kernel's blocks do not fit
    _, cflags = program.build(facts, KernelEventsConfig(), events=True)
    defines = dict(f[2:].split("=", 1) for f in cflags if f.startswith("-D") and "=" in f)
    assert 0 < int(defines["FLOWTEL_SKB_BLOCK_LEN"]) <= program.MAX_BLOCK_BYTES
    assert 0 < int(defines["FLOWTEL_NETDEV_BLOCK_LEN"]) <= program.MAX_BLOCK_BYTES
    assert int(defines["FLOWTEL_DROP_REASONS"]) == max(r for r in facts.drop_reasons if r < 1 << 16) + 1
    # Subsystem reasons (the subsystem in bits 16 and up) go to the hash map, not the array.
    assert program.drop_reason_slots({2: "NOT_SPECIFIED", 77: "X", (1 << 16) | 3: "MAC80211_X"}) == 78
