"""kallsyms: the same names bcc's BPF.ksym gives, from a compact index of the file."""
from __future__ import annotations

from pathlib import Path

import pytest

from flowtel.lib.bpf.kallsyms import KernelSymbols, symbol

_FILE = """\
ffffffff81000000 T _text
ffffffff81000100 t first_fn
ffffffff81000200 D some_data
ffffffff81000300 T second_fn
ffffffffc0001000 t mod_fn\t[nf_tables]
ffffffff81000400 W weak_fn
"""


def _symbols(tmp_path: Path, text: str, modules: str = "nf_tables 1 0 - Live 0x0\n") -> KernelSymbols:
    (tmp_path / "kallsyms").write_text(text)
    (tmp_path / "modules").write_text(modules)
    return KernelSymbols(str(tmp_path / "kallsyms"), str(tmp_path / "modules"))


def test_nearest_code_symbol_at_or_below_wins(tmp_path: Path) -> None:
    syms = _symbols(tmp_path, _FILE)
    assert syms.symbol(0xffffffff81000100) == "first_fn"
    assert syms.symbol(0xffffffff81000250) == "first_fn"  # data symbols are no function
    assert syms.symbol(0xffffffff81000350) == "second_fn"
    assert syms.symbol(0xffffffff81000500) == "weak_fn"  # the file is not sorted as read
    assert syms.symbol(0xffffffffc0001010) == "mod_fn"  # no module suffix, as bcc's show_module=False
    assert syms.symbol(0x1000) == ""
    assert syms.symbol(0) == ""


def test_a_module_loaded_later_is_indexed_when_asked_for(tmp_path: Path) -> None:
    syms = _symbols(tmp_path, _FILE)
    assert syms.symbol(0xffffffffc0002010) == "mod_fn"  # the old index knows no better
    (tmp_path / "kallsyms").write_text(_FILE + "ffffffffc0002000 t new_fn\t[veth]\n")
    (tmp_path / "modules").write_text("nf_tables 1 0 - Live 0x0\nveth 1 0 - Live 0x0\n")
    assert syms.symbol(0xffffffffc0002010) == "new_fn"


def test_hidden_addresses_name_nothing(tmp_path: Path) -> None:
    syms = _symbols(tmp_path, "0000000000000000 T _text\n0000000000000000 t tcp_v4_rcv\n")
    assert syms.symbol(0xffffffff81234567) == ""


@pytest.mark.kernel
def test_equals_bcc_on_this_kernel() -> None:
    from bcc import BPF

    lines = [line.split() for line in open("/proc/kallsyms")]
    per_address: dict[str, int] = {}
    for parts in lines:
        per_address[parts[0]] = per_address.get(parts[0], 0) + 1
    addresses = []
    for i, parts in enumerate(lines):
        # Aliases (several names at one address, e.g. _text and _stext) are either name; skip them.
        if parts[1] in "tT" and per_address[parts[0]] == 1 and (
                i % 997 == 0 or parts[2] in {"tcp_v4_rcv", "ip_rcv_core", "udp_queue_rcv_one_skb"}):
            addresses.append(int(parts[0], 16) + 1)
    assert len(addresses) > 50
    assert [symbol(a) for a in addresses] == [BPF.ksym(a, show_module=False, show_offset=False).decode()
                                              for a in addresses]


def test_prime_builds_the_index_once(tmp_path: Path) -> None:
    syms = _symbols(tmp_path, _FILE)
    syms.prime()
    (tmp_path / "kallsyms").write_text("")  # same modules: the primed index answers
    assert syms.symbol(0xffffffff81000350) == "second_fn"
