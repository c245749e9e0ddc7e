"""kallsyms.symbol: the same names bcc's BPF.ksym gives, from the file itself, with nothing kept."""
from __future__ import annotations

from pathlib import Path

import pytest

from flowtel.lib.bpf.kallsyms import symbol

_FILE = """\
ffffffff81000000 T _text
ffffffff81000100 t first_fn
ffffffff81000200 D some_data
ffffffff81000300 T second_fn
ffffffffc0001000 t mod_fn\t[nf_tables]
ffffffff81000400 W weak_fn
"""


def test_nearest_code_symbol_at_or_below_wins(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text(_FILE)
    assert symbol(0xffffffff81000100, str(path)) == "first_fn"
    assert symbol(0xffffffff81000250, str(path)) == "first_fn"  # data symbols are no function
    assert symbol(0xffffffff81000350, str(path)) == "second_fn"
    assert symbol(0xffffffff81000500, str(path)) == "weak_fn"  # the file is not sorted as read
    assert symbol(0xffffffffc0001010, str(path)) == "mod_fn"  # no module suffix, as bcc's show_module=False
    assert symbol(0x1000, str(path)) == ""
    assert symbol(0, str(path)) == ""


def test_hidden_addresses_name_nothing(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text("0000000000000000 T _text\n0000000000000000 t tcp_v4_rcv\n")
    assert symbol(0xffffffff81234567, str(path)) == ""


@pytest.mark.kernel
def test_equals_bcc_on_this_kernel() -> None:
    from bcc import BPF

    wanted = {"tcp_v4_rcv", "ip_rcv_core", "udp_queue_rcv_one_skb", "__netif_receive_skb_core", "sk_filter_trim_cap"}
    addresses = []
    for line in open("/proc/kallsyms"):
        parts = line.split()
        if parts[1] in "tT" and parts[2] in wanted:
            addresses.append(int(parts[0], 16) + 0x11)
    assert addresses
    for a in addresses:
        assert symbol(a) == BPF.ksym(a, show_module=False, show_offset=False).decode()
