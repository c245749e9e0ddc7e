"""The file exporter: Hubble JSON lines (checked field by field), rotation, compression, errors."""
from __future__ import annotations

import errno
import gzip
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from exporters.file import rotation
from exporters.file.config import FileConfig
from exporters.file.exporter import FileExporter, FileExportError
from exporters.file.factory import FACTORY
from flowtel.component import CreateSettings, Kind, Telemetry
from flowtel.config import ConfigError, parse_config
from flowtel.records import (
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_SYN,
    DnsInfo,
    Endpoint,
    EventKind,
    Flow,
    TcpFlagCounts,
    LostEvents,
    Record,
    TrafficDirection,
    Verdict,
    Workload,
    frozen_extensions,
)
from flowtel.lib.hubble.api.observer import observer_pb2
from google.protobuf import json_format

MIB = 1024 * 1024
T0 = 1732621545_123456789  # 2024-11-26T11:45:45.123456789Z
T0_TEXT = "2024-11-26T11:45:45.123456789Z"


def make_exporter(path: Path, **cfg: Any) -> tuple[FileExporter, Telemetry]:
    telemetry = Telemetry()
    settings = CreateSettings(id="file", node_name="node-1", telemetry=telemetry)
    return FileExporter(settings, FileConfig(path=str(path), **cfg)), telemetry


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line, after checking it parses strictly as Cilium's GetFlowsResponse."""
    lines = path.read_text().splitlines()
    for line in lines:
        json_format.Parse(line, observer_pb2.GetFlowsResponse())
    return [json.loads(line) for line in lines]


def ext(flow: dict[str, Any]) -> dict[str, Any]:
    """The Struct inside a flow's ``extensions`` Any."""
    assert flow["extensions"]["@type"] == "type.googleapis.com/google.protobuf.Struct"
    return flow["extensions"]["value"]  # type: ignore[no-any-return]  # the Struct's JSON object


def flow(**kw: Any) -> Flow:
    fields: dict[str, Any] = dict(
        time_ns=T0, node_name="node-1", verdict=Verdict.FORWARDED, ip_version=4,
        src_ip="10.1.0.5", dst_ip="10.1.0.9", protocol=6, src_port=41234, dst_port=80,
    )
    fields.update(kw)
    return Flow(**fields)


# --- what each line holds ---------------------------------------------------------------


def test_ipv4_tcp_aggregated_flow_with_endpoints_is_exactly_hubbles_object(tmp_path: Path) -> None:
    f = flow(
        traffic_direction=TrafficDirection.INGRESS, is_reply=False, ifindex=12, ifname="veth1a2b",
        packets=3, bytes=180, tcp_flags=TCP_SYN | TCP_ACK,
        source=Endpoint(identity=4242, namespace="shop", pod_name="frontend-7c9d",
                        labels=("k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=shop"),
                        workloads=(Workload("frontend", "Deployment"),)),
        destination=Endpoint(namespace="shop", pod_name="payments-0",
                             workloads=(Workload("payments", "StatefulSet"),)),
        destination_names=("payments.shop.svc.cluster.local",),
        extensions=frozen_extensions({"sampled": False}),
    )
    exporter, _ = make_exporter(tmp_path / "flows.log")
    exporter.start()
    exporter.consume([f])
    exporter.shutdown()
    raw = (tmp_path / "flows.log").read_text()
    assert raw.endswith("\n") and raw.count("\n") == 1
    # Compact separators, keys in protojson's order.
    assert raw[:-1] == json.dumps(json.loads(raw), separators=(",", ":"))
    got = json.loads(raw)
    uuid = got["flow"]["uuid"]
    assert got == {
        "flow": {
            "time": T0_TEXT,
            "uuid": uuid,
            "emitter": {"name": "flowtel", "version": got["flow"]["emitter"]["version"]},
            "verdict": "FORWARDED",
            "IP": {"source": "10.1.0.5", "destination": "10.1.0.9", "ipVersion": "IPv4"},
            "l4": {"TCP": {"source_port": 41234, "destination_port": 80, "flags": {"SYN": True, "ACK": True}}},
            "source": {
                "identity": 4242,
                "namespace": "shop",
                "labels": ["k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=shop"],
                "pod_name": "frontend-7c9d",
                "workloads": [{"name": "frontend", "kind": "Deployment"}],
            },
            "destination": {
                "namespace": "shop",
                "pod_name": "payments-0",
                "workloads": [{"name": "payments", "kind": "StatefulSet"}],
            },
            "Type": "L3_L4",
            "node_name": "node-1",
            "destination_names": ["payments.shop.svc.cluster.local"],
            "event_type": {"type": 4},
            "traffic_direction": "INGRESS",
            "trace_observation_point": "TO_ENDPOINT",
            "is_reply": False,
            "interface": {"index": 12, "name": "veth1a2b"},
            "Summary": "TCP Flags: SYN, ACK",
            "extensions": {"@type": "type.googleapis.com/google.protobuf.Struct",
                           "value": {"sampled": False, "packets": 3, "bytes": 180}},
        },
        "node_name": "node-1",
        "time": T0_TEXT,
    }


def test_each_kind_of_flow_has_its_hubble_fields(tmp_path: Path) -> None:
    ipv6_reply = flow(ip_version=6, src_ip="fd00::9", dst_ip="fd00::5", src_port=80, dst_port=41234,
                      tcp_flags=TCP_FIN | TCP_ACK | TCP_PSH, is_reply=True,
                      traffic_direction=TrafficDirection.EGRESS, packets=10, bytes=9000,
                      time_ns=T0 - 123456789 + 5_000_000)
    udp = flow(protocol=17, src_port=5353, dst_port=5353, time_ns=T0 - 123456789)
    icmp_echo = flow(protocol=1, src_port=8, dst_port=0, time_ns=T0 - 123456789 + 7000)
    icmp_reply = flow(protocol=1, src_port=0, dst_port=0)
    icmp6 = flow(protocol=58, ip_version=6, src_ip="fd00::1", dst_ip="fd00::2", src_port=1, dst_port=4)
    arp = flow(ip_version=0, src_ip="", dst_ip="", protocol=0, src_port=0, dst_port=0, ethertype=0x0806,
               packets=2, bytes=84, ifindex=12, ifname="veth1a2b",
               traffic_direction=TrafficDirection.EGRESS)
    drop = flow(verdict=Verdict.DROPPED, kind=EventKind.DROP, drop_reason="NETFILTER_DROP", tcp_flags=TCP_SYN, packets=1, bytes=60,
                traffic_direction=TrafficDirection.EGRESS)
    request = flow(protocol=17, dst_ip="10.0.0.10", src_port=40000, dst_port=53, kind=EventKind.DNS_REQUEST,
                   is_reply=False, l7=DnsInfo(query="example.com.", qtypes=("A",)),
                   ifname="veth1a2b", ifindex=12)
    response = flow(protocol=17, src_ip="10.0.0.10", dst_ip="10.1.0.5", src_port=53, dst_port=40000,
                    kind=EventKind.DNS_RESPONSE, is_reply=True, latency_ns=1_234_567,
                    l7=DnsInfo(query="www.example.com.", qtypes=("A",), ips=("93.184.215.14",), ttl=300,
                               cnames=("edge.example.net.",), rrtypes=("CNAME", "A")),
                    source_names=("kube-dns.kube-system.svc.cluster.local",))
    nxdomain = flow(protocol=17, src_port=53, dst_port=40001, kind=EventKind.DNS_RESPONSE,
                    is_reply=True, latency_ns=800_000, l7=DnsInfo(query="nope.example.", qtypes=("AAAA",), rcode=3))
    unanswered = flow(protocol=17, src_port=40002, dst_port=53, kind=EventKind.DNS_UNANSWERED, verdict=Verdict.ERROR,
                      l7=DnsInfo(query="slow.example.", qtypes=("A",)))
    retransmit = flow(tcp_flags=TCP_ACK, kind=EventKind.TCP_RETRANSMIT, verdict=Verdict.TRACED,
                      extensions=frozen_extensions({"segments": 1}))
    counted = flow(tcp_flags=TCP_SYN | TCP_ACK, packets=2, bytes=120, tcp_flag_counts=TcpFlagCounts(syn=1, syn_ack=1))
    flows: list[Record] = [ipv6_reply, udp, icmp_echo, icmp_reply, icmp6, arp, drop, request, response, nxdomain,
             unanswered, retransmit, counted]

    path = tmp_path / "flows.log"
    exporter, _ = make_exporter(path)
    exporter.consume(flows)
    exporter.shutdown()
    out = [line["flow"] for line in read_lines(path)]
    assert len(out) == len(flows)
    got = dict(zip(["ipv6_reply", "udp", "icmp_echo", "icmp_reply", "icmp6", "arp", "drop", "request",
                    "response", "nxdomain", "unanswered", "retransmit", "counted"], out))

    f = got["ipv6_reply"]
    assert f["time"] == "2024-11-26T11:45:45.005Z"  # protojson trims to 3/6/9 digits
    assert f["IP"] == {"source": "fd00::9", "destination": "fd00::5", "ipVersion": "IPv6"}
    assert f["l4"]["TCP"]["flags"] == {"FIN": True, "PSH": True, "ACK": True}
    assert f["Summary"] == "TCP Flags: ACK, FIN, PSH"
    assert f["is_reply"] is True and f["reply"] is True
    assert f["traffic_direction"] == "EGRESS"
    assert f["event_type"] == {"type": 4, "sub_type": 5}
    assert f["trace_observation_point"] == "FROM_ENDPOINT"
    assert ext(f) == {"packets": 10, "bytes": 9000}

    f = got["udp"]
    assert f["time"] == "2024-11-26T11:45:45Z"
    assert f["l4"] == {"UDP": {"source_port": 5353, "destination_port": 5353}}
    assert f["Summary"] == "UDP"
    for absent in ("is_reply", "reply", "traffic_direction", "trace_observation_point", "interface",
                   "drop_reason_desc", "source", "destination", "l7", "extensions", "ethernet"):
        assert absent not in f, absent
    assert f["event_type"] == {"type": 4}

    assert got["icmp_echo"]["time"] == "2024-11-26T11:45:45.000007Z"
    assert got["icmp_echo"]["l4"] == {"ICMPv4": {"type": 8}}
    assert got["icmp_echo"]["Summary"] == "ICMPv4 EchoRequest"
    assert got["icmp_reply"]["l4"] == {"ICMPv4": {}}  # protojson omits type 0 / code 0
    assert got["icmp_reply"]["Summary"] == "ICMPv4 EchoReply"
    assert got["icmp6"]["l4"] == {"ICMPv6": {"type": 1, "code": 4}}
    assert got["icmp6"]["Summary"] == "ICMPv6 DestinationUnreachable(PortUnreachable)"

    f = got["arp"]
    assert f["ethernet"] == {}
    assert "IP" not in f and "l4" not in f
    assert f["Summary"] == "ARP"
    assert ext(f) == {"packets": 2, "bytes": 84, "ethertype": "0x0806"}
    assert f["interface"] == {"index": 12, "name": "veth1a2b"}

    f = got["drop"]
    assert f["verdict"] == "DROPPED"
    # NETFILTER_DROP has no Cilium DropReason: DROP_REASON_UNKNOWN (omitted), the exact reason in extensions.
    assert "drop_reason_desc" not in f and ext(f)["drop_reason"] == "NETFILTER_DROP"
    assert f["event_type"] == {"type": 1, "sub_type": 1}
    assert "trace_observation_point" not in f
    assert f["Summary"] == "TCP Flags: SYN"
    assert "drop_reason_desc" not in got["udp"]

    f = got["request"]
    assert f["Type"] == "L7"
    assert f["event_type"] == {"type": 129}
    assert f["l7"] == {"type": "REQUEST", "dns": {"query": "example.com.", "observation_source": "ebpf",
                                                  "qtypes": ["A"]}}
    assert f["l4"] == {"UDP": {"source_port": 40000, "destination_port": 53}}
    assert f["is_reply"] is False and "reply" not in f
    assert f["Summary"] == "DNS Query example.com. A"
    assert "extensions" not in f  # L7 flows carry no packet counts

    f = got["response"]
    assert f["l7"] == {
        "type": "RESPONSE",
        "latency_ns": "1234567",
        "dns": {"query": "www.example.com.", "ips": ["93.184.215.14"], "ttl": 300,
                "cnames": ["edge.example.net."], "observation_source": "ebpf", "qtypes": ["A"],
                "rrtypes": ["CNAME", "A"]},
    }
    assert f["source_names"] == ["kube-dns.kube-system.svc.cluster.local"]
    assert f["Summary"] == 'DNS Answer "93.184.215.14" CNAMEs: "edge.example.net." TTL: 300 (Query www.example.com. A)'

    f = got["nxdomain"]
    assert f["l7"]["dns"]["rcode"] == 3 and "ips" not in f["l7"]["dns"]
    assert f["l7"]["latency_ns"] == "800000"
    assert f["Summary"] == "DNS Answer RCode: Non-Existent Domain TTL: 0 (Query nope.example. AAAA)"

    f = got["unanswered"]
    assert ext(f) == {"dns_unanswered": True} and f["verdict"] == "ERROR" and "type" not in f["l7"]
    assert "is_reply" not in f and f["Summary"] == "DNS Query slow.example. A (no answer within the timeout)"
    f = got["retransmit"]
    assert ext(f) == {"segments": 1, "tcp_event": "retransmit"} and f["Type"] == "SOCK"
    assert f["event_type"] == {"type": 7} and f["verdict"] == "TRACED" and f["Summary"] == "TCP retransmit"
    assert ext(got["counted"]) == {"packets": 2, "bytes": 120, "tcp_flags": {"SYN": 1, "SYN-ACK": 1, "FIN": 0, "RST": 0}}


def test_lost_events_line(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    exporter, _ = make_exporter(path)
    exporter.consume([LostEvents(time_ns=T0, source="PERF_EVENT_RING_BUFFER", count=42, node_name="node-1")])
    exporter.shutdown()
    assert read_lines(path) == [{
        "lost_events": {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "42"},
        "node_name": "node-1",
        "time": T0_TEXT,
    }]


def test_batches_append_and_existing_content_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "flows.log"
    exporter, telemetry = make_exporter(path)
    exporter.start()
    assert path.exists() and path.stat().st_size == 0  # opened at start, parents created
    assert path.stat().st_mode & 0o777 == 0o600
    exporter.consume([flow(src_port=1)])
    exporter.consume([flow(src_port=2), flow(src_port=3)])
    exporter.flush()
    exporter.shutdown()
    # A restarted agent appends.
    again, _ = make_exporter(path)
    again.start()
    again.consume([flow(src_port=4)])
    again.shutdown()
    ports = [line["flow"]["l4"]["TCP"]["source_port"] for line in read_lines(path)]
    assert ports == [1, 2, 3, 4]
    assert telemetry.get("file", "bytes_written") == len(path.read_text().splitlines()[0]) * 3 + 3


def test_one_write_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_write_all = rotation._write_all

    def counting_write_all(fd: int, data: bytes) -> None:
        calls.append(len(data))
        real_write_all(fd, data)

    exporter, _ = make_exporter(tmp_path / "flows.log")
    exporter.start()
    monkeypatch.setattr(rotation, "_write_all", counting_write_all)
    exporter.consume([flow(src_port=p) for p in range(1000, 1500)])
    assert len(calls) == 1
    assert calls[0] == (tmp_path / "flows.log").stat().st_size


# --- rotation ---------------------------------------------------------------------------


def numbered(n: int, start: int = 0) -> list[Record]:
    # Same line length for every record (5-digit ports, 9-digit nanoseconds), so the
    # number of files rotation must produce can be computed.
    return [flow(src_port=10000 + i, time_ns=T0 + i * 1000, packets=1, bytes=100,
                 tcp_flags=TCP_ACK) for i in range(start, start + n)]


def ports_in(path: Path) -> list[int]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as fh:
        return [json.loads(line)["flow"]["l4"]["TCP"]["source_port"] for line in fh]


def line_length() -> int:
    from flowtel.lib.hubble import convert as hubble

    return len(json.dumps(hubble.record_envelope(numbered(1)[0]), separators=(",", ":"))) + 1


def test_rotation_keeps_every_record_exactly_once_and_files_under_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    exporter, telemetry = make_exporter(path, max_size_mb=1, max_backups=100)
    exporter.start()
    total = 7000
    for start in range(0, total, 500):
        exporter.consume(numbered(500, start))
    exporter.shutdown()

    backups = sorted(tmp_path.glob("flows-*.log"))
    per_file = MIB // line_length()
    expected_files = -(-total // per_file)
    assert len(backups) == expected_files - 1
    assert telemetry.get("file", "file_rotations") == len(backups)
    for b in backups:
        assert b.stat().st_size <= MIB
        assert b.stat().st_size == per_file * line_length()  # filled up to the last whole line
        assert b.name.startswith("flows-") and b.name.endswith(".log")
    everything = [p for b in backups for p in ports_in(b)] + ports_in(path)
    assert Counter(everything) == Counter(range(10000, 10000 + total))
    assert everything == list(range(10000, 10000 + total))  # names sort oldest first


def test_rotation_deletes_backups_beyond_max_backups(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    exporter, _ = make_exporter(path, max_size_mb=1, max_backups=2)
    total = 7000
    for start in range(0, total, 700):
        exporter.consume(numbered(700, start))
    exporter.shutdown()
    backups = sorted(tmp_path.glob("flows-*.log"))
    assert len(backups) == 2
    kept = [p for b in backups for p in ports_in(b)] + ports_in(path)
    per_file = MIB // line_length()
    # The newest records survive, contiguous and in order.
    assert kept == list(range(10000 + total - len(kept), 10000 + total))
    assert len(kept) == 2 * per_file + (total - 1) % per_file + 1


def test_max_backups_zero_keeps_only_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    exporter, _ = make_exporter(path, max_size_mb=1, max_backups=0)
    exporter.consume(numbered(4000))
    exporter.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flows.log"]
    assert ports_in(path)[-1] == 10000 + 3999


def test_existing_large_file_is_rotated_before_the_first_write(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    old = b'{"old":1}\n' * (MIB // 10)
    path.write_bytes(old)
    exporter, _ = make_exporter(path, max_size_mb=1)
    exporter.start()
    exporter.consume(numbered(10))
    exporter.shutdown()
    (backup,) = tmp_path.glob("flows-*.log")
    assert backup.read_bytes() == old
    assert ports_in(path) == list(range(10000, 10010))


def test_compressed_backups_are_valid_gzip_with_all_records(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    exporter, _ = make_exporter(path, max_size_mb=1, max_backups=10, compress=True)
    total = 8000
    for start in range(0, total, 1000):
        exporter.consume(numbered(1000, start))
    exporter.shutdown()
    names = sorted(p.name for p in tmp_path.iterdir())
    gz = sorted(tmp_path.glob("flows-*.json.gz"))
    assert len(gz) == -(-total // (MIB // line_length())) - 1 >= 3
    assert names == sorted([p.name for p in gz] + ["flows.json"])  # no plain or .tmp leftovers
    for g in gz:
        assert g.read_bytes()[:2] == b"\x1f\x8b"
        assert g.stat().st_size < MIB // 4  # it really is compressed
    everything = [p for g in gz for p in ports_in(g)] + ports_in(path)
    assert everything == list(range(10000, 10000 + total))


def test_uncompressed_leftover_is_compressed_at_the_next_rotation(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    leftover = tmp_path / "flows-2020-01-01T00-00-00.000.log"
    leftover.write_text('{"old":1}\n')
    exporter, _ = make_exporter(path, max_size_mb=1, compress=True)
    exporter.consume(numbered(3000))
    exporter.shutdown()
    assert not leftover.exists()
    with gzip.open(tmp_path / (leftover.name + ".gz"), "rt") as fh:
        assert fh.read() == '{"old":1}\n'


# --- errors and recovery ----------------------------------------------------------------


def test_unwritable_path_gives_a_clear_error_and_a_later_batch_succeeds(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where a directory should be")
    path = blocker / "flows.log"
    exporter, _ = make_exporter(path)
    with pytest.raises(FileExportError) as started:
        exporter.start()
    message = str(started.value)
    assert "exporter file: cannot write flow logs to" in message
    assert str(path) in message
    assert "a parent of the path is a file, not a directory; fix `path`" in message

    with pytest.raises(FileExportError, match="cannot write flow logs"):
        exporter.consume([flow(src_port=1)])

    blocker.unlink()  # the operator fixes it
    exporter.consume([flow(src_port=2)])
    exporter.shutdown()
    assert [line["flow"]["l4"]["TCP"]["source_port"] for line in read_lines(path)] == [2]


def test_directory_as_path_is_explained(tmp_path: Path) -> None:
    exporter, _ = make_exporter(tmp_path)
    with pytest.raises(FileExportError, match="the path is a directory; point `path` at a file inside it"):
        exporter.start()


def test_fifo_as_path_is_refused_instead_of_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "flows.log"
    os.mkfifo(fifo)
    exporter, _ = make_exporter(fifo)
    with pytest.raises(FileExportError, match="not a regular file"):
        exporter.start()


def test_disk_full_mid_write_fails_the_batch_and_the_next_batch_starts_a_clean_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "flows.log"
    exporter, _ = make_exporter(path)
    exporter.consume([flow(src_port=1)])
    real_write_all = rotation._write_all

    def short_then_full(fd: int, data: bytes) -> None:
        # What the kernel does when the disk fills: part of the data lands, then ENOSPC.
        os.write(fd, data[: len(data) // 3])  # mid-way through the first line
        monkeypatch.setattr(rotation, "_write_all", real_write_all)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rotation, "_write_all", short_then_full)
    with pytest.raises(FileExportError, match="the disk is full; free space or lower max_size_mb / max_backups"):
        exporter.consume([flow(src_port=2), flow(src_port=3)])
    exporter.consume([flow(src_port=4)])
    exporter.shutdown()

    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0])["flow"]["l4"]["TCP"]["source_port"] == 1
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[1])  # the cut-off fragment stays on its own line …
    assert json.loads(lines[2])["flow"]["l4"]["TCP"]["source_port"] == 4  # … and spoils nothing else


def test_unencodable_record_fails_the_batch_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    exporter, _ = make_exporter(path)
    exporter.start()
    with pytest.raises(TypeError):
        exporter.consume([flow(src_port=1), flow(extensions={"bad": object()})])
    assert path.read_bytes() == b""


# --- config and factory -----------------------------------------------------------------


def test_config_defaults_mirror_hubbles_flags() -> None:
    cfg = FileConfig(path="/var/log/flowtel/flows.log")
    assert (cfg.max_size_mb, cfg.max_backups, cfg.compress) == (10, 5, False)
    # Values from ${env:…} arrive as strings.
    cfg = FileConfig.model_validate({"path": "x.log", "max_size_mb": "20", "max_backups": "0", "compress": "true"})
    assert (cfg.max_size_mb, cfg.max_backups, cfg.compress) == (20, 0, True)


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({}, "path", "Field required"),
        ({"path": ""}, "path", "must name a file"),
        ({"path": "/var/log/flowtel/"}, "path", "not a directory"),
        ({"path": "f.log", "max_size_mb": 0}, "max_size_mb", "greater than 0"),
        ({"path": "f.log", "max_size_mb": -5}, "max_size_mb", "greater than 0"),
        ({"path": "f.log", "max_size_mb": "big"}, "max_size_mb", "valid integer"),
        ({"path": "f.log", "max_backups": -1}, "max_backups", "greater than or equal to 0"),
        ({"path": "f.log", "compress": "maybe"}, "compress", "valid boolean"),
        ({"path": "f.log", "rotate": True}, "rotate", "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_values(raw: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as err:
        FileConfig.model_validate(raw)
    (problem,) = err.value.errors()
    assert problem["loc"] == (key,)
    assert fragment in str(err.value)


def test_config_error_through_the_loader_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"exporters": {"file/audit": {"path": "a.log", "max_size_mb": 0}}}, "agent.yaml",
                     factories={Kind.EXPORTER: {"file": FACTORY}})
    assert str(err.value).startswith("config error in agent.yaml: exporters.file/audit.max_size_mb: ")
    assert "greater than 0" in str(err.value)


def test_factory_creates_a_logs_exporter(tmp_path: Path) -> None:
    assert (FACTORY.type, FACTORY.kind, tuple(FACTORY.signals)) == ("file", Kind.EXPORTER, ("logs",))
    assert FACTORY.config_class is FileConfig
    settings = CreateSettings(id="file", node_name="n", telemetry=Telemetry())
    exporter = FACTORY.create(settings, FileConfig(path=str(tmp_path / "f.log")))
    assert isinstance(exporter, FileExporter)
    assert not (tmp_path / "f.log").exists()  # nothing touched before start


def test_allow_deny_and_field_mask_write_masked_lines_and_count_filtered(tmp_path: Path) -> None:
    from tests.flowsamples import lost, sample_flows

    flows = sample_flows()
    exporter, telemetry = make_exporter(
        tmp_path / "flows.log",
        allow_list=[{"source_pod": ["shop/"]}, {"verdict": ["DROPPED"]}],
        deny_list=[{"protocol": ["dns"]}],
        field_mask=["time", "verdict", "source.namespace", "source.pod_name", "IP.destination", "l4.TCP.destination_port"],
    )
    exporter.start()
    exporter.consume(list(flows.values()) + [lost()])
    exporter.shutdown()
    lines = read_lines(tmp_path / "flows.log")
    # F1, F2, F6 from shop (F4 is DNS: denied), F3 dropped; the lost-events line always passes.
    assert [line["flow"]["time"] for line in lines[:-1]] == [
        "2024-11-26T11:45:46Z", "2024-11-26T11:45:47Z", "2024-11-26T11:45:48Z", "2024-11-26T11:45:51Z"]
    assert lines[0] == {
        "flow": {"time": "2024-11-26T11:45:46Z", "verdict": "FORWARDED", "IP": {"destination": "10.0.0.2"},
                 "l4": {"TCP": {"destination_port": 8080}},
                 "source": {"namespace": "shop", "pod_name": "frontend-7c9d"}},
        "node_name": "node-1", "time": "2024-11-26T11:45:46Z",
    }
    assert lines[2]["flow"] == {"time": "2024-11-26T11:45:48Z", "verdict": "DROPPED",
                                "IP": {"destination": "10.0.0.1"}, "l4": {"TCP": {"destination_port": 80}},
                                "source": {"namespace": "default", "pod_name": "client-1"}}
    assert lines[-1]["lost_events"] == {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "3"}
    assert telemetry.get("file", "records_filtered") == 5
    # a batch filtered away entirely writes nothing and is no error
    exporter2, telemetry2 = make_exporter(tmp_path / "none.log", deny_list=[{"source_ip": ["0.0.0.0/0", "::/0"]}])
    exporter2.start()
    exporter2.consume([flows["F1"], flows["F9"]])
    exporter2.shutdown()
    assert (tmp_path / "none.log").read_text() == ""
    assert telemetry2.get("file", "records_filtered") == 2
