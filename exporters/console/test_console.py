"""The console exporter and the compact line format it prints (flowtel.printer.compact_line)."""
from __future__ import annotations

import io
import json
import re

import pytest
from pydantic import ValidationError

from exporters.console.config import ConsoleConfig
from exporters.console.exporter import ConsoleExporter
from exporters.console.factory import FACTORY
from flowtel.lib.hubble import convert as hubble, printer, summary as _summary, timefmt
from flowtel.component import CreateSettings, Kind, Telemetry
from flowtel.records import (
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    DnsInfo,
    Endpoint,
    Flow,
    EventKind,
    LostEvents,
    Record,
    TrafficDirection,
    Verdict,
    Workload,
)

T0 = 1732621545_123456789  # 2024-11-26T11:45:45.123456789Z
STAMP = "Nov 26 11:45:45.123"


def settings() -> CreateSettings:
    return CreateSettings(id="console", node_name="node-1", telemetry=Telemetry())


def tcp_flow(**kw: object) -> Flow:
    fields: dict[str, object] = dict(
        time_ns=T0,
        node_name="node-1",
        verdict=Verdict.FORWARDED,
        ip_version=4,
        src_ip="10.1.0.5",
        dst_ip="10.1.0.9",
        protocol=6,
        src_port=41234,
        dst_port=80,
        traffic_direction=TrafficDirection.INGRESS,
        is_reply=False,
        ifindex=12,
        ifname="veth1a2b",
        packets=3,
        bytes=180,
        tcp_flags=TCP_SYN | TCP_ACK,
        source=Endpoint(namespace="shop", pod_name="frontend-7c9d",
                        workloads=[Workload("frontend", "Deployment")]),
        destination=Endpoint(namespace="shop", pod_name="payments-0"),
    )
    fields.update(kw)
    return Flow(**fields)  # type: ignore[arg-type]


def dns_flow(l7_type: str, dns: DnsInfo, **kw: object) -> Flow:
    fields: dict[str, object] = dict(
        time_ns=T0,
        node_name="node-1",
        verdict=Verdict.FORWARDED,
        ip_version=4,
        src_ip="10.1.0.5",
        dst_ip="10.0.0.10",
        protocol=17,
        src_port=40000,
        dst_port=53,
        kind=EventKind.DNS_RESPONSE if l7_type == "RESPONSE" else EventKind.DNS_REQUEST,
        l7=dns,
        is_reply=l7_type == "RESPONSE",
    )
    fields.update(kw)
    return Flow(**fields)  # type: ignore[arg-type]


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


# --- the compact line -------------------------------------------------------------------


def test_compact_tcp_aggregated_flow_reads_like_hubble() -> None:
    assert printer.compact_line(tcp_flow()) == (
        f"{STAMP}: shop/frontend-7c9d:41234 (ID:0) -> shop/payments-0:80 (ID:0) "
        "to-endpoint FORWARDED (TCP Flags: SYN, ACK) pkts=3 bytes=180 on veth1a2b INGRESS"
    )


def test_compact_reply_flips_arrow_and_ends() -> None:
    line = printer.compact_line(tcp_flow(is_reply=True, tcp_flags=TCP_ACK | TCP_FIN,
                                        traffic_direction=TrafficDirection.EGRESS))
    # The client stays on the left, as hubble prints replies.
    assert line.startswith(f"{STAMP}: shop/payments-0:80 (ID:0) <- shop/frontend-7c9d:41234 (ID:0) ")
    assert "from-endpoint FORWARDED (TCP Flags: ACK, FIN)" in line
    assert line.endswith(" on veth1a2b EGRESS")


def test_compact_unknown_reply_state_uses_hubbles_double_arrow() -> None:
    line = printer.compact_line(tcp_flow(is_reply=None))
    assert " (ID:0) <> shop/payments-0:80 " in line


def test_compact_without_pods_uses_addresses_and_brackets_ipv6() -> None:
    line = printer.compact_line(tcp_flow(ip_version=6, src_ip="fd00::5", dst_ip="fd00::9",
                                        source=None, destination=None))
    assert f"{STAMP}: [fd00::5]:41234 (ID:0) -> [fd00::9]:80 (ID:0) " in line


def test_compact_prefers_dns_names_over_addresses_when_no_pod() -> None:
    line = printer.compact_line(tcp_flow(destination=None, destination_names=["api.example.com"],
                                        dst_port=443))
    assert "-> api.example.com:443 (ID:0) " in line


def test_compact_reserved_identity_by_name() -> None:
    line = printer.compact_line(tcp_flow(destination=Endpoint(identity=2), dst_ip="1.1.1.1"))
    assert "-> 1.1.1.1:80 (world) " in line


def test_compact_drop_shows_reason_before_verdict() -> None:
    line = printer.compact_line(tcp_flow(verdict=Verdict.DROPPED, drop_reason="NETFILTER_DROP",
                                        tcp_flags=TCP_SYN, is_reply=None, packets=1, bytes=60))
    assert "(ID:0) NETFILTER_DROP DROPPED (TCP Flags: SYN) pkts=1 bytes=60" in line


def test_compact_icmp_has_no_ports_and_gopacket_names() -> None:
    echo = tcp_flow(protocol=1, src_port=8, dst_port=0, tcp_flags=0, packets=0, bytes=0)
    assert printer.compact_line(echo) == (
        f"{STAMP}: shop/frontend-7c9d (ID:0) -> shop/payments-0 (ID:0) "
        "to-endpoint FORWARDED (ICMPv4 EchoRequest) on veth1a2b INGRESS"
    )
    unreachable = tcp_flow(protocol=58, ip_version=6, src_port=1, dst_port=4, tcp_flags=0)
    assert "(ICMPv6 DestinationUnreachable(PortUnreachable))" in printer.compact_line(unreachable)
    assert _summary.summary(tcp_flow(protocol=1, src_port=5, dst_port=9)) == "ICMPv4 Redirect(Code: 9)"
    assert _summary.summary(tcp_flow(protocol=1, src_port=42, dst_port=1)) == "ICMPv4 42(1)"
    assert _summary.summary(tcp_flow(protocol=1, src_port=0, dst_port=0)) == "ICMPv4 EchoReply"


def test_summaries_for_other_protocols() -> None:
    assert _summary.summary(tcp_flow(protocol=17)) == "UDP"
    assert _summary.summary(tcp_flow(protocol=132)) == "SCTP"
    assert _summary.summary(tcp_flow(protocol=47)) == "IPv4"
    assert _summary.summary(tcp_flow(protocol=47, ip_version=6)) == "IPv6"
    assert _summary.summary(tcp_flow(tcp_flags=0)) == "TCP"
    all_flags = TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN | 0x08 | 0x20 | 0x40 | 0x80
    assert _summary.summary(tcp_flow(tcp_flags=all_flags)) == "TCP Flags: SYN, ACK, RST, FIN, PSH, URG, ECE, CWR"


def test_compact_non_ip_frame() -> None:
    arp = tcp_flow(ip_version=0, src_ip="", dst_ip="", protocol=0, src_port=0, dst_port=0,
                   ethertype=0x0806, source=None, destination=None, is_reply=None, packets=2,
                   bytes=84, tcp_flags=0, traffic_direction=TrafficDirection.EGRESS)
    assert printer.compact_line(arp) == (
        f"{STAMP}: N/A (ID:0) <> N/A (ID:0) from-endpoint FORWARDED (ARP) pkts=2 bytes=84 on veth1a2b EGRESS"
    )
    assert _summary.summary(tcp_flow(ip_version=0, ethertype=0x88B5, protocol=0)) == "Ethernet 0x88b5"


def test_compact_dns_request_and_responses() -> None:
    request = dns_flow("REQUEST", DnsInfo(query="example.com.", qtypes=("A",)))
    assert printer.compact_line(request) == (
        f"{STAMP}: 10.1.0.5:40000 (ID:0) -> 10.0.0.10:53 (ID:0) "
        "dns-request ebpf FORWARDED (DNS Query example.com. A)"
    )
    answer = dns_flow("RESPONSE", DnsInfo(query="example.com.", qtypes=("A",), ips=["1.2.3.4", "5.6.7.8"],
                                          ttl=300), src_ip="10.0.0.10", dst_ip="10.1.0.5",
                      src_port=53, dst_port=40000, latency_ns=1_500_000)
    line = printer.compact_line(answer)
    assert f"{STAMP}: 10.1.0.5:40000 (ID:0) <- 10.0.0.10:53 (ID:0) dns-response ebpf FORWARDED " in line
    assert line.endswith('(DNS Answer "1.2.3.4,5.6.7.8" TTL: 300 (Query example.com. A))')

    cname = dns_flow("RESPONSE", DnsInfo(query="www.example.com.", qtypes=("A",), ips=["1.2.3.4"],
                                         cnames=["edge.example.net."], ttl=60, observation_source="proxy"))
    assert _summary.summary(cname) == (
        'DNS Answer "1.2.3.4" CNAMEs: "edge.example.net." TTL: 60 (Proxy www.example.com. A)'
    )
    nx = dns_flow("RESPONSE", DnsInfo(query="nope.example.", qtypes=("AAAA",), rcode=3))
    assert _summary.summary(nx) == "DNS Answer RCode: Non-Existent Domain TTL: 0 (Query nope.example. AAAA)"
    refused = dns_flow("RESPONSE", DnsInfo(query="x.", qtypes=("A",), rcode=5))
    assert _summary.summary(refused) == "DNS Answer RCode: Query Refused TTL: 0 (Query x. A)"


def test_compact_tcp_event_names_the_event() -> None:
    line = printer.compact_line(tcp_flow(kind=EventKind.TCP_RESET_SENT, verdict=Verdict.TRACED, tcp_flags=TCP_RST,
                                         packets=0, bytes=0))
    assert "(ID:0) tcp-reset_sent TRACED (TCP reset sent) on veth1a2b INGRESS" in line
    assert "pkts=" not in line


def test_compact_timestamp_pads_the_day_like_go() -> None:
    t = 1730854923_004000000  # 2024-11-06T01:02:03.004Z
    assert printer.compact_line(tcp_flow(time_ns=t)).startswith("Nov  6 01:02:03.004: ")


def test_compact_escapes_control_characters_from_the_network() -> None:
    evil = dns_flow("REQUEST", DnsInfo(query="a\x1b[2J\nb.", qtypes=("A",)))
    line = printer.compact_line(evil)
    assert "\x1b" not in line and "\n" not in line
    assert "DNS Query a\\x1b[2J\\x0ab. A" in line


def test_compact_colors_like_hubble_only_when_asked() -> None:
    plain = printer.compact_line(tcp_flow())
    assert "\x1b" not in plain
    colored = printer.compact_line(tcp_flow(), color=True)
    assert "\x1b[32mFORWARDED\x1b[0m" in colored
    assert "\x1b[36mshop/frontend-7c9d\x1b[0m:\x1b[33m41234\x1b[0m" in colored
    assert "\x1b[35m(ID:0)\x1b[0m" in colored
    dropped = printer.compact_line(tcp_flow(verdict=Verdict.DROPPED, drop_reason="NO_SOCKET"), color=True)
    assert "\x1b[31mDROPPED\x1b[0m" in dropped
    # Stripping the escapes gives back the plain line.
    assert re.sub(r"\x1b\[\d+m", "", colored) == plain


def test_lost_events_line() -> None:
    lost = LostEvents(time_ns=T0, source="PERF_EVENT_RING_BUFFER", count=17, node_name="node-1")
    assert printer.lost_compact_line(lost) == f"{STAMP}: EVENTS LOST: PERF_EVENT_RING_BUFFER 17"


# --- the exporter -----------------------------------------------------------------------


def test_exporter_writes_one_line_per_record_in_one_write_per_batch() -> None:
    stream = CountingStream()
    exporter = ConsoleExporter(settings(), ConsoleConfig(), stream=stream)
    exporter.start()
    first, second = tcp_flow(), tcp_flow(src_port=41235)
    batch: list[Record] = [first, second, LostEvents(time_ns=T0, source="ring", count=2)]
    exporter.consume(batch)
    assert stream.writes == 1
    lines = stream.getvalue().split("\n")
    assert lines[-1] == ""  # every line is terminated
    assert lines[:-1] == [
        printer.compact_line(first),
        printer.compact_line(second),
        f"{STAMP}: EVENTS LOST: ring 2",
    ]
    assert ":41235 (ID:0)" in lines[1]
    exporter.flush()
    assert stream.flushes == 1
    exporter.consume([])
    assert stream.writes == 1
    exporter.shutdown()


def test_exporter_json_verbosity_writes_hubble_envelopes() -> None:
    stream = io.StringIO()
    exporter = ConsoleExporter(settings(), ConsoleConfig(verbosity="json"), stream=stream)
    exporter.consume([tcp_flow(), LostEvents(time_ns=T0, source="ring", count=2, node_name="node-1")])
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["time"] == "2024-11-26T11:45:45.123456789Z"
    assert first["node_name"] == "node-1"
    assert first["flow"]["Summary"] == "TCP Flags: SYN, ACK"
    assert first["flow"]["l4"] == {"TCP": {"source_port": 41234, "destination_port": 80,
                                           "flags": {"SYN": True, "ACK": True}}}
    # flowtel's own source names map onto Cilium's LostEventSource (a kernel-side loss here).
    assert second == {"lost_events": {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "2"},
                      "node_name": "node-1", "time": "2024-11-26T11:45:45.123456789Z"}
    assert ", " not in stream.getvalue().split('"Summary"')[0]  # compact separators


def test_exporter_color_setting_reaches_the_lines() -> None:
    stream = io.StringIO()
    ConsoleExporter(settings(), ConsoleConfig(color=True), stream=stream).consume([tcp_flow()])
    assert "\x1b[32mFORWARDED" in stream.getvalue()


def test_exporter_defaults_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    exporter = ConsoleExporter(settings(), ConsoleConfig())
    exporter.consume([tcp_flow()])
    exporter.flush()
    assert capsys.readouterr().out == printer.compact_line(tcp_flow()) + "\n"


def test_exporter_rejects_records_that_are_not_flow_logs_without_writing() -> None:
    stream = io.StringIO()
    exporter = ConsoleExporter(settings(), ConsoleConfig(), stream=stream)
    with pytest.raises(TypeError, match="not a flow-log record: dict"):
        exporter.consume([tcp_flow(), {"metric": 1}])  # type: ignore[list-item]
    assert stream.getvalue() == ""


# --- config and factory -----------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    cfg = ConsoleConfig()
    assert (cfg.verbosity, cfg.color) == ("compact", False)
    assert ConsoleConfig.model_validate({"verbosity": "json", "color": "true"}).color is True
    with pytest.raises(ValidationError, match="compact"):
        ConsoleConfig.model_validate({"verbosity": "table"})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ConsoleConfig.model_validate({"colour": True})
    with pytest.raises(ValidationError):
        ConsoleConfig.model_validate({"color": "sometimes"})


def test_factory_creates_a_logs_exporter() -> None:
    assert FACTORY.type == "console"
    assert FACTORY.kind is Kind.EXPORTER
    assert tuple(FACTORY.signals) == ("logs",)
    assert FACTORY.config_class is ConsoleConfig
    exporter = FACTORY.create(settings(), ConsoleConfig())
    assert isinstance(exporter, ConsoleExporter)
