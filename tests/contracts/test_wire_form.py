"""Contract: every record's JSON is the proto3 JSON mapping of Cilium's ``flow.Flow``.

For one record of every kind flowtel emits: the envelope line parses strictly (no unknown
fields) as the project's ``observer.GetFlowsResponse``; the fast JSON builder equals what
``json_format.MessageToDict`` makes of the message (so it is the canonical mapping, not just
a parsable one); the shape rules a consumer ignoring ``extensions`` relies on hold; and the
wire form parses back to the same record.
"""
from __future__ import annotations

import json
import re
import threading

import pytest
from google.protobuf import json_format

from flowtel.lib.hubble import convert
from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.lib.hubble.parse import FlowJSONError, record_from_envelope
from flowtel.records import (
    replace,
    TCP_RST,
    DnsInfo,
    EventKind,
    Flow,
    LostEvents,
    TcpFlagCounts,
    TrafficDirection,
    Verdict,
    frozen_extensions,
)
from flowtel.recordtables import CILIUM_DROP_REASONS, KERNEL_TO_CILIUM_DROP, cilium_lost_source
from tests.flowsamples import lost, sample_flows

T = 1_733_000_000_123_456_789


def _f(**kw: object) -> Flow:
    base: dict[str, object] = dict(time_ns=T, node_name="node-1", verdict=Verdict.FORWARDED, ip_version=4,
                                   src_ip="10.0.0.1", dst_ip="10.0.0.2", protocol=6, src_port=40000, dst_port=80)
    base.update(kw)
    return Flow(**base)  # type: ignore[arg-type]  # keyword table of Flow fields


def every_kind() -> dict[str, Flow]:
    flows = dict(sample_flows())
    flows.update({
        "kernel_drop_unmapped": _f(verdict=Verdict.DROPPED, kind=EventKind.DROP, drop_reason="NETFILTER_DROP",
                                   packets=1, bytes=60, extensions=frozen_extensions({"drop_direction": "ingress"})),
        "kernel_drop_mapped": _f(verdict=Verdict.DROPPED, kind=EventKind.DROP, drop_reason="NO_SOCKET", protocol=17,
                                 packets=1, bytes=40),
        "fqdn_denied": _f(verdict=Verdict.DROPPED, kind=EventKind.DROP, drop_reason="POLICY_DENIED",
                          traffic_direction=TrafficDirection.EGRESS, is_reply=False, packets=3, bytes=180,
                          tcp_flags=0x02, ifindex=9, ifname="veth9"),
        "fqdn_audit": _f(verdict=Verdict.AUDIT, kind=EventKind.DROP, drop_reason="POLICY_DENIED", packets=1, bytes=60),
        "retransmit": _f(verdict=Verdict.TRACED, kind=EventKind.TCP_RETRANSMIT,
                         extensions=frozen_extensions({"segments": 2, "tcp_state": "ESTABLISHED"})),
        "reset_sent": _f(verdict=Verdict.TRACED, kind=EventKind.TCP_RESET_SENT, tcp_flags=TCP_RST,
                         extensions=frozen_extensions({"reset_reason": "NOT_SPECIFIED"})),
        "reset_received": _f(verdict=Verdict.TRACED, kind=EventKind.TCP_RESET_RECEIVED, tcp_flags=TCP_RST),
        "established": _f(verdict=Verdict.TRACED, kind=EventKind.TCP_ESTABLISHED,
                          extensions=frozen_extensions({"handshake_rtt_ns": 120_000})),
        "closed": _f(verdict=Verdict.TRACED, kind=EventKind.TCP_CLOSED, ip_version=6, src_ip="fd00::1", dst_ip="fd00::2",
                     ethertype=0x86DD, extensions=frozen_extensions({"lifetime_ns": 5_000_000})),
        "nxdomain": _f(kind=EventKind.DNS_RESPONSE, protocol=17, src_port=53, dst_port=40001, is_reply=True,
                       l7=DnsInfo(query="nope.example.", qtypes=("A",), rcode=3), latency_ns=1500),
        "unanswered": _f(verdict=Verdict.ERROR, kind=EventKind.DNS_UNANSWERED, protocol=17, dst_port=53,
                         l7=DnsInfo(query="slow.example.", qtypes=("AAAA",))),
        "proxy_denied": _f(verdict=Verdict.DROPPED, kind=EventKind.DNS_RESPONSE, protocol=17, src_port=53,
                           is_reply=True, drop_reason="POLICY_DENIED",
                           l7=DnsInfo(query="evil.example.", qtypes=("A",), rcode=5, observation_source="proxy"),
                           extensions=frozen_extensions({"dnsproxy": True})),
        "udp_counted": _f(protocol=17, packets=4, bytes=400, traffic_direction=TrafficDirection.INGRESS,
                          is_reply=True),
        "tcp_counts": _f(packets=3, bytes=180, tcp_flags=0x12, tcp_flag_counts=TcpFlagCounts(syn=1, syn_ack=1)),
        "aggregated": _f(packets=10, bytes=1000, extensions=frozen_extensions(
            {"flows": 4, "window_start": "2024-12-01T00:00:00Z", "window_end": "2024-12-01T00:00:30Z"})),
    })
    return flows


KINDS = every_kind()


def parse_strict(line: str) -> observer_pb2.GetFlowsResponse:
    msg = observer_pb2.GetFlowsResponse()
    json_format.Parse(line, msg, ignore_unknown_fields=False)
    return msg


@pytest.mark.parametrize("name", sorted(KINDS))
def test_envelope_line_parses_strictly_and_is_the_canonical_mapping(name: str) -> None:
    flow = KINDS[name]
    line = json.dumps(convert.envelope(flow), separators=(",", ":"))
    msg = parse_strict(line)
    assert msg.flow.uuid and re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                                          msg.flow.uuid)
    assert msg.flow.emitter.name == "flowtel" and msg.flow.emitter.version
    assert msg.node_name == "node-1" and msg.time.ToNanoseconds() == flow.time_ns
    # What the fast builder wrote is exactly protojson's mapping of the message it parses into.
    canonical = json_format.MessageToDict(msg.flow, preserving_proto_field_name=True)
    assert canonical == convert.flow_json(flow)
    assert json_format.MessageToDict(convert.to_proto(flow), preserving_proto_field_name=True) == canonical
    # And it reads back as the same record, printing the same again (uuid included).
    back = record_from_envelope(json.loads(line))
    assert isinstance(back, Flow)
    assert replace(back) == flow
    assert convert.flow_json(back) == convert.flow_json(flow)


def _ext(flow: Flow) -> dict[str, object]:
    any_ = convert.flow_json(flow).get("extensions")
    if any_ is None:
        return {}
    assert any_["@type"] == "type.googleapis.com/google.protobuf.Struct"
    return any_["value"]  # type: ignore[no-any-return]  # the Struct's JSON object


def test_packet_flows_carry_counts_and_the_observation_point() -> None:
    j = convert.flow_json(KINDS["F1"])
    assert j["Type"] == "L3_L4" and j["event_type"] == {"type": 4, "sub_type": 5}
    assert j["trace_observation_point"] == "FROM_ENDPOINT" and j["verdict"] == "FORWARDED"
    assert _ext(KINDS["F1"]) == {"packets": 1, "bytes": 74, "tcp_flags": {"SYN": 1, "SYN-ACK": 0, "FIN": 0, "RST": 0}}
    assert convert.flow_json(KINDS["udp_counted"])["event_type"] == {"type": 4}  # TO_ENDPOINT is 0


def test_drops_name_cilium_reasons_and_keep_the_kernels() -> None:
    unmapped, mapped, denied = (convert.flow_json(KINDS[n]) for n in ("kernel_drop_unmapped", "kernel_drop_mapped",
                                                                     "fqdn_denied"))
    # NETFILTER_DROP has no Cilium equivalent: DROP_REASON_UNKNOWN (the enum's zero, omitted),
    # and a sub_type that Hubble's printer cannot read as "Success" (0).
    assert "drop_reason_desc" not in unmapped and unmapped["event_type"]["type"] == 1
    assert unmapped["event_type"]["sub_type"] not in (0, *CILIUM_DROP_REASONS.values())
    assert _ext(KINDS["kernel_drop_unmapped"])["drop_reason"] == "NETFILTER_DROP"
    assert mapped["drop_reason_desc"] == "SOCKET_LOOKUP_FAILED" and mapped["event_type"] == {"type": 1, "sub_type": 178}
    assert denied["drop_reason_desc"] == "POLICY_DENIED" and denied["event_type"] == {"type": 1, "sub_type": 133}
    assert denied["drop_reason"] == 133 and denied["verdict"] == "DROPPED"
    audit = convert.flow_json(KINDS["fqdn_audit"])
    assert audit["verdict"] == "AUDIT" and audit["event_type"] == {"type": 5}  # a policy verdict, not a drop


def test_every_mapped_drop_reason_is_a_value_of_ciliums_enum() -> None:
    for kernel, cilium in KERNEL_TO_CILIUM_DROP.items():
        assert flow_pb2.DropReason.Value(cilium) == CILIUM_DROP_REASONS[cilium], kernel
    for name, number in CILIUM_DROP_REASONS.items():
        assert flow_pb2.DropReason.Value(name) == number


@pytest.mark.parametrize("name", ["retransmit", "reset_sent", "reset_received", "established", "closed"])
def test_tcp_events_cannot_be_taken_for_packets(name: str) -> None:
    j = convert.flow_json(KINDS[name])
    assert j["Type"] == "SOCK" and j["event_type"] == {"type": 7}  # Cilium's socket trace, not a packet trace
    assert j["verdict"] == "TRACED" and "trace_observation_point" not in j
    ext = _ext(KINDS[name])
    assert ext["tcp_event"] == KINDS[name].kind.value and "packets" not in ext and "bytes" not in ext


def test_unanswered_dns_is_not_a_second_request() -> None:
    j = convert.flow_json(KINDS["unanswered"])
    assert j["Type"] == "L7" and j["event_type"] == {"type": 129} and j["verdict"] == "ERROR"
    assert "type" not in j["l7"] and "is_reply" not in j and j["l7"]["dns"]["query"] == "slow.example."
    assert _ext(KINDS["unanswered"]) == {"dns_unanswered": True}
    request = convert.flow_json(KINDS["F4"])
    assert request["l7"]["type"] == "REQUEST" and request["is_reply"] is False


def test_lost_events_map_onto_ciliums_sources() -> None:
    for source, cilium in (("FLOW_MAP_FULL", "PERF_EVENT_RING_BUFFER"), ("QUEUE_FULL:file", "OBSERVER_EVENTS_QUEUE"),
                           ("EXPORT_FAILED:otlp", "OBSERVER_EVENTS_QUEUE"), ("HUBBLE_RING_BUFFER", "HUBBLE_RING_BUFFER"),
                           ("DNS_RING_BUFFER_FULL", "PERF_EVENT_RING_BUFFER")):
        assert cilium_lost_source(source) == cilium
        record = LostEvents(T, source, 7, "node-1")
        msg = parse_strict(json.dumps(convert.lost_envelope(record)))
        assert flow_pb2.LostEventSource.Name(msg.lost_events.source) == cilium
        assert msg.lost_events.num_events_lost == 7
    parse_strict(json.dumps(convert.lost_envelope(lost())))


def test_response_message_matches_the_json() -> None:
    flow = KINDS["F5"]
    resp = convert.to_response(flow)
    assert json_format.MessageToDict(resp, preserving_proto_field_name=True) == convert.envelope(flow)


def test_wire_form_is_built_once_and_shared_across_threads() -> None:
    flow = KINDS["F6"]
    fresh = replace(flow)
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.append(convert.flow_json(fresh)["uuid"])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1 and convert.flow_json(fresh) is convert.flow_json(fresh)
    # A changed record is a new record, with a wire form (and uuid) of its own.
    assert convert.flow_json(replace(fresh, packets=99))["uuid"] != seen[0]


def test_a_line_with_a_field_ciliums_schema_lacks_is_refused() -> None:
    env = convert.envelope(KINDS["F1"])
    bad = {**env, "flow": {**env["flow"], "drop_reason_desc": "NETFILTER_DROP"}}  # not a DropReason value
    with pytest.raises(FlowJSONError):
        record_from_envelope(bad)
    with pytest.raises(FlowJSONError):
        record_from_envelope({**env, "flow": {**env["flow"], "packets": 3}})


@pytest.mark.parametrize("name", sorted(KINDS))
def test_the_shared_line_is_the_envelope_encoded(name: str) -> None:
    flow = KINDS[name]
    line = convert.envelope_line(flow)
    assert json.loads(line) == convert.envelope(flow)
    assert line == json.dumps(convert.envelope(flow), separators=(",", ":"))
    assert convert.envelope_line(flow) is not line and convert.flow_text(flow) is convert.flow_text(flow)
    parse_strict(line)
    lost_line = convert.envelope_line(lost())
    assert json.loads(lost_line) == convert.lost_envelope(lost())
