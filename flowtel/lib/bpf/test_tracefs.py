"""Parsing tracefs format files: field layouts, enum tables, the generated C structs.

Fixtures are real format files of Linux 6.18 (testdata/tracefs/README.md).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowtel.lib.bpf import tracefs
from receiver.ebpf.kernel_events import program

FIXTURES = Path(__file__).resolve().parent / "testdata" / "tracefs"


def fixture(category: str, event: str) -> tracefs.TracepointFormat:
    return tracefs.parse_format((FIXTURES / f"{category}_{event}.format").read_text(), category, event)


def test_kfree_skb_fields_and_drop_reasons() -> None:
    fmt = fixture("skb", "kfree_skb")
    assert fmt.event == "kfree_skb" and fmt.id == 2310
    reason = fmt.fields["reason"]
    assert (reason.type, reason.offset, reason.size, reason.signed) == ("enum skb_drop_reason", 36, 4, False)
    assert fmt.fields["skbaddr"].type == "void *" and fmt.fields["skbaddr"].offset == 8
    assert fmt.fields["protocol"].size == 2
    assert fmt.fields["common_pid"].is_common
    reasons = fmt.symbols["reason"]
    # Every { value, "NAME" } entry of the table, no more and no fewer.
    text = (FIXTURES / "skb_kfree_skb.format").read_text()
    assert len(reasons) == len(re.findall(r'\{ \d+, "', text)) == 127
    assert reasons[2] == "NOT_SPECIFIED" and reasons[3] == "NO_SOCKET"
    assert reasons[12] == "NETFILTER_DROP" and reasons[42] == "TCP_INVALID_SEQUENCE"
    assert 0 not in reasons and 1 not in reasons  # NOT_DROPPED_YET / CONSUMED: not in 6.18's table
    assert program.drop_reason_min(reasons) == 2


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({0: "NOT_SPECIFIED", 1: "NO_SOCKET"}, 0),  # 5.17: every traced free is a drop
        ({0: "NOT_DROPPED_YET", 1: "NOT_SPECIFIED", 2: "NO_SOCKET"}, 1),  # 5.19
        ({0: "NOT_DROPPED_YET", 1: "CONSUMED", 2: "NOT_SPECIFIED"}, 2),  # 6.0–6.x with CONSUMED listed
        ({0: "NOT_DROPPED_YET", 1: "CONSUMED", 5: "SOMETHING"}, 2),  # no NOT_SPECIFIED: after the non-drops
    ],
)
def test_first_drop_reason_across_kernel_generations(table: dict[int, str], expected: int) -> None:
    assert program.drop_reason_min(table) == expected


def test_tcp_state_names_from_inet_sock_set_state() -> None:
    fmt = fixture("sock", "inet_sock_set_state")
    states = program.tcp_state_names(fmt)
    assert states[1] == "ESTABLISHED" and states[2] == "SYN_SENT" and states[7] == "CLOSE"
    assert states[10] == "LISTEN" and len(states) == 12
    assert fmt.symbols["oldstate"] == fmt.symbols["newstate"]
    assert fmt.symbols["protocol"] == {6: "IPPROTO_TCP", 132: "IPPROTO_SCTP", 262: "IPPROTO_MPTCP"}
    assert fmt.fields["saddr_v6"].array_len == 16 and fmt.fields["saddr_v6"].offset == 40


def test_unresolved_enum_names_give_no_table() -> None:
    # tcp_retransmit_skb prints its state table with C names the kernel did not resolve.
    fmt = fixture("tcp", "tcp_retransmit_skb")
    assert "state" not in fmt.symbols
    assert fmt.symbols["family"] == {2: "AF_INET", 10: "AF_INET6"}
    assert fmt.fields["err"].offset == 76 and fmt.fields["err"].signed


def test_send_reset_sockaddr_layout_and_reasons() -> None:
    fmt = fixture("tcp", "tcp_send_reset")
    assert fmt.fields["saddr"].array_len == 28 and fmt.fields["saddr"].size == 28
    assert "sport" not in fmt.fields  # 6.10+: the ends are sockaddrs, not sport/dport
    assert fmt.symbols["reason"][1] == "NO_SOCKET" and fmt.symbols["reason"][12] == "TCP_ABORT_ON_LINGER"


def test_c_struct_places_every_field_at_its_offset() -> None:
    fmt = fixture("tcp", "tcp_retransmit_skb")
    text = tracefs.c_struct(fmt, "flowtel_tp_tcp_retransmit_skb")
    body = text[text.index("{") + 1 : text.index("};")]
    assert "__u8 __pad_0[8];" in body  # the common header is never read
    assert "__u16 sport;" in body and "__u8 saddr_v6[16];" in body and "__s32 state;" in body
    assert "__s32 err;" in body
    for name, f in fmt.fields.items():
        if not f.is_common:
            assert f"offsetof(struct flowtel_tp_tcp_retransmit_skb, {name}) == {f.offset}" in text
            assert f"#define FLOWTEL_TP_TCP_RETRANSMIT_SKB_{name.upper()} {f.size}" in text


def test_c_struct_types_enums_by_size() -> None:
    text = tracefs.c_struct(fixture("skb", "kfree_skb"), "flowtel_tp_kfree_skb")
    assert "enum" not in text.split("};")[0]  # the kernel's enum may not exist in the headers
    assert "__u8 __pad_34[2];" in text and "__u32 reason;" in text


def test_c_struct_of_an_older_send_reset_defines_its_port_fields() -> None:
    # The layout 5.x kernels use (fields from include/trace/events/tcp.h there).
    old = """name: tcp_send_reset
ID: 1
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;

print fmt: "sport=%hu", REC->sport
"""
    fmt = tracefs.parse_format(old, "tcp", "tcp_send_reset")
    text = tracefs.c_struct(fmt, "flowtel_tp_tcp_send_reset")
    assert "#define FLOWTEL_TP_TCP_SEND_RESET_SPORT 2" in text
    assert "FLOWTEL_TP_TCP_SEND_RESET_REASON" not in text
    assert fmt.symbols == {}


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(tracefs.TracefsError, match="lists no fields"):
        tracefs.parse_format("name: x\nID: 1\nformat:\n", "c", "x")
    (tmp_path / "events").mkdir()
    with pytest.raises(tracefs.TracefsError, match="does not exist on this kernel"):
        tracefs.read_format("skb", "kfree_skb", str(tmp_path))
    fmt = fixture("tcp", "tcp_receive_reset")
    with pytest.raises(tracefs.TracefsError, match="no field state"):
        fmt.require("sport", "state")


def test_read_format_from_a_tracefs_tree(tmp_path: Path) -> None:
    d = tmp_path / "events" / "skb" / "kfree_skb"
    d.mkdir(parents=True)
    (d / "format").write_text((FIXTURES / "skb_kfree_skb.format").read_text())
    assert tracefs.read_format("skb", "kfree_skb", str(tmp_path)).fields["reason"].offset == 36
