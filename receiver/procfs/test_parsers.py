"""Parsers and family selection of the procfs receiver, against copies of a real node's files
(testdata/, taken from a 6.18 kernel) and hand-made edge cases."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from flowtel.records import MetricKind
from receiver.procfs import families
from receiver.procfs.families import InterfaceFilter, StatisticSelector
from receiver.procfs.netdev import parse_net_dev
from receiver.procfs.snmp import parse_paired, parse_snmp6, to_int
from receiver.procfs.sockets import TCP_STATES, socket_states

TESTDATA = Path(__file__).parent / "testdata"


def fixture(name: str) -> str:
    return (TESTDATA / name).read_text()


# -- /proc/net/snmp and /proc/net/netstat --------------------------------------------------


def test_snmp_fixture() -> None:
    sections, errors = parse_paired(fixture("snmp"))
    assert errors == 0
    assert list(sections) == ["Ip", "Icmp", "IcmpMsg", "Tcp", "Udp", "UdpLite"]
    assert sections["Ip"]["ForwDatagrams"] == 4730030
    assert sections["Ip"]["OutTransmits"] == 4734375
    assert sections["Tcp"]["MaxConn"] == -1
    assert sections["Tcp"]["OutRsts"] == 55
    assert sections["Udp"]["OutDatagrams"] == 69
    assert len(sections["Icmp"]) == 29


def test_netstat_fixture() -> None:
    sections, errors = parse_paired(fixture("netstat"))
    assert errors == 0
    assert {name: len(c) for name, c in sections.items()} == {"TcpExt": 135, "IpExt": 18, "MPTcpExt": 76}
    assert sections["TcpExt"]["TW"] == 114
    assert sections["IpExt"]["InOctets"] == 41448227065
    assert sections["IpExt"]["OutOctets"] == 41257252218


def test_paired_missing_columns_keeps_the_fields_both_lines_have() -> None:
    text = "Tcp: A B C\nTcp: 1 2\nUdp: X\nUdp: 9\n"
    sections, errors = parse_paired(text)
    assert sections == {"Tcp": {"A": 1, "B": 2}, "Udp": {"X": 9}}
    assert errors == 1


def test_paired_extra_columns_of_a_newer_kernel_are_read() -> None:
    text = "TcpExt: TCPTimeouts TCPFutureCounter\nTcpExt: 3 77\n"
    assert parse_paired(text) == ({"TcpExt": {"TCPTimeouts": 3, "TCPFutureCounter": 77}}, 0)


def test_paired_garbage_is_counted_and_parsing_resumes() -> None:
    text = "Ip: A B\nIp: 1 2\n\x00garbage here\nTcp: C D\nTcp: 3 x\nUdp: E\nUdp: 5\nIcmp: F\n"
    sections, errors = parse_paired(text)
    assert sections == {"Ip": {"A": 1, "B": 2}, "Tcp": {"C": 3}, "Udp": {"E": 5}}
    # the garbage line, the non-numeric value, the trailing header without values
    assert errors == 3


def test_paired_mismatched_prefix_is_not_paired() -> None:
    # "Ip: A" lost its values; "Tcp: 1" lost its header; then a good pair.
    sections, errors = parse_paired("Ip: A\nTcp: 1\nTcp: B\nTcp: 2\n")
    assert sections == {"Tcp": {"B": 2}}
    assert errors == 2


@pytest.mark.parametrize("raw, value", [("0", 0), ("18446744073709551615", 2**64 - 1), ("-1", -1),
                                        ("1_000", None), ("٣", None), ("", None), ("-", None), ("1.5", None),
                                        ("+3", None), ("0x10", None)])
def test_to_int_takes_only_what_a_kernel_prints(raw: str, value: int | None) -> None:
    assert to_int(raw) == value


def test_empty_files() -> None:
    assert parse_paired("") == ({}, 0)
    assert parse_snmp6("") == ({}, 0)
    assert parse_net_dev("") == ({}, 1)  # no header: counted once
    assert socket_states("") == (Counter(), 0)


# -- /proc/net/snmp6 -----------------------------------------------------------------------


def test_snmp6_fixture() -> None:
    sections, errors = parse_snmp6(fixture("snmp6"))
    assert errors == 0
    assert sorted(sections) == ["Icmp6", "Ip6", "Udp6", "UdpLite6"]
    assert sum(len(c) for c in sections.values()) == 91
    assert sections["Ip6"]["Ip6InOctets"] == 248800
    assert sections["Icmp6"]["Icmp6OutMsgs"] == 21
    assert "UdpLite6InErrors" in sections["UdpLite6"] and "UdpLite6InErrors" not in sections["Udp6"]


def test_snmp6_malformed_lines() -> None:
    text = "Ip6InReceives 5\nIp6InDiscards\t\nUdp6InErrors 1 2\n\nIp6OutDiscards x\nUdp6NoPorts 3\nFuture 4\n"
    sections, errors = parse_snmp6(text)
    assert sections == {"Ip6": {"Ip6InReceives": 5}, "Udp6": {"Udp6NoPorts": 3}, "": {"Future": 4}}
    assert errors == 3


# -- /proc/net/dev -------------------------------------------------------------------------


def test_net_dev_fixture() -> None:
    ifaces, errors = parse_net_dev(fixture("dev"))
    assert errors == 0
    assert list(ifaces) == ["lo", "ifb0", "ifb1", "eth0"]
    eth0 = ifaces["eth0"]
    assert len(eth0) == 16
    assert (eth0["rx_bytes"], eth0["rx_packets"], eth0["tx_bytes"], eth0["tx_packets"]) == (191377967, 5657, 366762, 3052)
    assert eth0["rx_dropped"] == 0 and eth0["tx_carrier_errors"] == 0 and eth0["tx_collisions"] == 0
    assert ifaces["lo"]["rx_packets"] == ifaces["lo"]["tx_packets"] == 1303


DEV_HEADER = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
)


def test_net_dev_column_order_comes_from_the_header() -> None:
    text = DEV_HEADER + "  eth0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n"
    ifaces, errors = parse_net_dev(text)
    assert errors == 0
    assert ifaces["eth0"] == {
        "rx_bytes": 1, "rx_packets": 2, "rx_errors": 3, "rx_dropped": 4, "rx_fifo_errors": 5,
        "rx_frame_errors": 6, "rx_compressed": 7, "rx_multicast": 8,
        "tx_bytes": 9, "tx_packets": 10, "tx_errors": 11, "tx_dropped": 12, "tx_fifo_errors": 13,
        "tx_collisions": 14, "tx_carrier_errors": 15, "tx_compressed": 16,
    }


def test_net_dev_newer_kernel_columns() -> None:
    header = DEV_HEADER.replace("multicast|", "multicast nohandler|")
    text = header + "veth1: 1 2 3 4 5 6 7 8 99 9 10 11 12 13 14 15 16\n"
    ifaces, errors = parse_net_dev(text)
    assert errors == 0
    assert ifaces["veth1"]["rx_nohandler"] == 99
    assert ifaces["veth1"]["tx_bytes"] == 9 and ifaces["veth1"]["tx_compressed"] == 16


def test_net_dev_missing_columns_and_garbage_skip_the_line() -> None:
    text = DEV_HEADER + (
        "  eth0: 1 2 3\n"          # too short: positions cannot be trusted
        "garbage without colon\n"
        "  eth1: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 x 16\n"
        "  eth2: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17\n"  # one value more than the header
    )
    ifaces, errors = parse_net_dev(text)
    assert list(ifaces) == ["eth2"]
    assert ifaces["eth2"]["tx_compressed"] == 16
    assert errors == 3


def test_net_dev_unreadable_header_falls_back_to_the_classic_layout() -> None:
    text = "something else\n  eth0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n"
    ifaces, errors = parse_net_dev(text)
    assert errors == 2  # the missing header, and the line in its place
    assert ifaces["eth0"]["tx_carrier_errors"] == 15


# -- socket tables -------------------------------------------------------------------------


def test_tcp_fixtures() -> None:
    # Counts from `awk '{print $4}' | sort | uniq -c` on the same files.
    assert socket_states(fixture("tcp")) == (Counter({1: 6, 5: 1, 6: 7, 8: 1, 10: 2}), 0)
    assert socket_states(fixture("tcp6")) == (Counter({1: 6, 5: 1, 8: 1, 10: 1}), 0)
    assert socket_states(fixture("udp")) == (Counter({7: 1}), 0)
    assert socket_states(fixture("udp6")) == (Counter({7: 1}), 0)


def test_socket_table_garbage_and_no_trailing_newline() -> None:
    header = fixture("tcp").splitlines()[0]
    good = fixture("tcp").splitlines()[1]
    text = "\n".join([header, good, "garbage", "   7: 0100007F:1F90", "", good.replace(" 0A ", " 01 ")])
    states, errors = socket_states(text)
    assert sum(states.values()) == 2
    assert errors == 3


def test_tcp_state_names_are_the_kernels() -> None:
    assert TCP_STATES[1] == "ESTABLISHED" and TCP_STATES[10] == "LISTEN" and TCP_STATES[11] == "CLOSING"
    assert len(set(TCP_STATES.values())) == 11


# -- selection and points ------------------------------------------------------------------


def test_selector_defaults_include_exclude() -> None:
    sel = StatisticSelector({"ListenDrops", "TCPTimeouts"}, include=["TCP.*Retrans"], exclude=["TCPTimeouts"])
    assert sel("ListenDrops")
    assert sel("TCPFastRetrans")
    assert not sel("TCPTimeouts"), "exclude wins over a default"
    assert not sel("XTCPFastRetrans"), "patterns match the whole name"
    assert not sel("TCPFastRetransX")
    assert not sel("ListenOverflows")


def _fixture_counters() -> dict[str, dict[str, dict[str, int]]]:
    return {
        "snmp": parse_paired(fixture("snmp"))[0],
        "netstat": parse_paired(fixture("netstat"))[0],
        "snmp6": parse_snmp6(fixture("snmp6"))[0],
    }


@pytest.mark.parametrize("family", families.STATISTIC_FAMILIES, ids=lambda f: f.key)
def test_every_default_statistic_exists_in_a_real_kernel(family: families.StatisticFamily) -> None:
    """A typo in a default name would silently never be reported."""
    points = families.statistic_points(family, StatisticSelector(family.defaults), _fixture_counters(), 1, {})
    assert {p.attributes["statistic_name"] for p in points} == set(family.defaults)


def test_interface_defaults_exist_in_a_real_kernel() -> None:
    ifaces, _ = parse_net_dev(fixture("dev"))
    assert families.INTERFACE_DEFAULTS <= set(ifaces["eth0"])


def test_statistic_points_are_cumulative_sums_with_labels() -> None:
    counters = _fixture_counters()
    sel = StatisticSelector(families.TCP_CONNECTION_STATS.defaults)
    points = families.statistic_points(families.TCP_CONNECTION_STATS, sel, counters, 123, {"netns": "x"})
    by_name = {p.attributes["statistic_name"]: p for p in points}
    assert by_name["OutRsts"].value == 55  # from Tcp in snmp
    assert by_name["ListenDrops"].value == counters["netstat"]["TcpExt"]["ListenDrops"]
    for p in points:
        assert p.name == "networkobservability_tcp_connection_stats"
        assert p.kind is MetricKind.SUM and p.time_ns == 123
        assert set(p.attributes) == {"netns", "statistic_name"}


def test_settings_and_levels_are_never_reported_as_counters() -> None:
    counters = _fixture_counters()
    everything = StatisticSelector((), include=[".*"])
    names: set[str] = set()
    for family in families.STATISTIC_FAMILIES:
        points = families.statistic_points(family, everything, counters, 1, {})
        got = [p.attributes["statistic_name"] for p in points]
        assert len(got) == len(set(got)), f"{family.key}: a statistic name twice"
        names |= set(got)
    assert not names & {"Forwarding", "DefaultTTL", "RtoAlgorithm", "RtoMin", "RtoMax", "MaxConn", "CurrEstab", "MPCurrEstab"}
    assert {"RetransSegs", "TCPTimeouts", "MPCapableSYNRX", "InOctets", "Ip6InOctets", "InReceives", "Udp6NoPorts", "NoPorts"} <= names
    # Sections outside the families stay out.
    assert not names & {"InMsgs", "Icmp6InMsgs", "UdpLite6InErrors", "InType3"}


def test_interface_points_filter_names_and_statistics() -> None:
    ifaces, _ = parse_net_dev(fixture("dev"))
    sel = StatisticSelector(families.INTERFACE_DEFAULTS, include=["rx_packets"])
    points = families.interface_points(ifaces, InterfaceFilter(["*"], ["lo"]), sel, 7, {})
    assert {p.attributes["interface_name"] for p in points} == {"eth0", "ifb0", "ifb1"}
    eth0 = {p.attributes["statistic_name"]: p.value for p in points if p.attributes["interface_name"] == "eth0"}
    assert set(eth0) == families.INTERFACE_DEFAULTS | {"rx_packets"}
    assert eth0["rx_packets"] == 5657
    assert all(p.kind is MetricKind.SUM and p.name == "networkobservability_interface_stats" for p in points)
    only_ifb = families.interface_points(ifaces, InterfaceFilter(["ifb*"], ["ifb1"]), sel, 7, {})
    assert {p.attributes["interface_name"] for p in only_ifb} == {"ifb0"}


def test_tcp_state_points_report_every_state() -> None:
    points = families.tcp_state_points(Counter({1: 3, 10: 2}), 5, {})
    values = {p.attributes["state"]: p.value for p in points}
    assert values["ESTABLISHED"] == 3 and values["LISTEN"] == 2 and values["TIME_WAIT"] == 0
    assert len(values) == 11 and "UNKNOWN" not in values
    assert all(p.kind is MetricKind.GAUGE and p.name == "networkobservability_tcp_state" for p in points)
    with_unknown = families.tcp_state_points(Counter({1: 1, 13: 4}), 5, {})
    assert {p.attributes["state"]: p.value for p in with_unknown}["UNKNOWN"] == 4
