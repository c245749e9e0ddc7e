"""DNS events → flows, without a kernel: parsing, matching, TCP framing, malformed input."""
from __future__ import annotations

import random
import struct

import dns.message
import dns.rcode
import dns.rrset
import pytest

from flowtel.histogram import DNS_LATENCY_BOUNDS
from flowtel.records import FlowType, MetricKind, TrafficDirection
from flowtel.lib.bpf.tcattach import Interface
from flowtel.records import EventKind, Verdict
from receiver.ebpf.dns import EXTENSION_UNANSWERED, DnsEvent, DnsTracker
from receiver.ebpf.dnswire import MalformedMessage, parse_message, split_tcp
from tests import dnsfuzz

S = 1_000_000_000
OFFSET = 1_700_000_000 * S  # monotonic → wall clock, fixed for the tests
CLIENT = bytes([10, 0, 0, 1]) + bytes(12)
SERVER = bytes([10, 0, 0, 2]) + bytes(12)
CLIENT6 = bytes.fromhex("fd0000f7000000000000000000000002")
SERVER6 = bytes.fromhex("fd0000f7000000000000000000000003")
IFACES = {3: Interface(3, "vethclient", "veth"), 4: Interface(4, "vethserver", "veth"), 9: Interface(9, "eth0", "")}
INGRESS, EGRESS = 0, 1
UDP, TCP = 17, 6


def tracker(timeout: float = 5, max_pending: int = 1024) -> DnsTracker:
    return DnsTracker(node_name="node-1", timeout_ns=int(timeout * S), max_pending=max_pending,
                      interface_of=IFACES.get, wall_offset_ns=lambda: OFFSET)


def event(payload: bytes, *, ts: int, ifindex: int, hook: int, reply: bool, proto: int = UDP,
          v6: bool = False, sport: int = 40000, seq: int = 0, orig_len: int | None = None,
          capture: int = 512) -> DnsEvent:
    client, server = (CLIENT6, SERVER6) if v6 else (CLIENT, SERVER)
    src, dst, sp, dp = (server, client, 53, sport) if reply else (client, server, sport, 53)
    return DnsEvent(ts_ns=ts, ifindex=ifindex, hook=hook, family=6 if v6 else 4, protocol=proto,
                    saddr=src, daddr=dst, sport=sp, dport=dp, tcp_seq=seq,
                    orig_len=len(payload) if orig_len is None else orig_len, payload=payload[:capture])


def frame(message: bytes) -> bytes:
    """DNS over TCP: a 2-byte length before the message."""
    return struct.pack("!H", len(message)) + message


def query(name: str = "Web.Example.", qtype: str = "A", qid: int = 0x4242) -> dns.message.Message:
    q = dns.message.make_query(name, qtype)
    q.id = qid
    return q


def answer(q: dns.message.Message, *rrsets: dns.rrset.RRset, rcode: int = 0) -> bytes:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    r.answer.extend(rrsets)
    return r.to_wire()


def a_answer(q: dns.message.Message) -> bytes:
    return answer(
        q,
        dns.rrset.from_text("web.example.", 300, "IN", "CNAME", "lb.example."),
        dns.rrset.from_text("lb.example.", 60, "IN", "A", "192.0.2.1", "192.0.2.2"),
    )


def test_exchange_seen_on_both_veths_gives_two_requests_and_two_matched_responses() -> None:
    t = tracker()
    q = query()
    wire_q, wire_r = q.to_wire(), a_answer(q)
    flows = t.process([
        event(wire_q, ts=1000, ifindex=3, hook=INGRESS, reply=False),  # leaves the client pod
        event(wire_q, ts=1010, ifindex=4, hook=EGRESS, reply=False),  # enters the server pod
        event(wire_r, ts=5000, ifindex=4, hook=INGRESS, reply=True),
        event(wire_r, ts=5020, ifindex=3, hook=EGRESS, reply=True),
    ])
    assert [(f.ifname, f.l7_type, f.traffic_direction, f.is_reply, f.latency_ns) for f in flows] == [
        ("vethclient", "REQUEST", TrafficDirection.EGRESS, False, 0),
        ("vethserver", "REQUEST", TrafficDirection.INGRESS, False, 0),
        ("vethserver", "RESPONSE", TrafficDirection.EGRESS, True, 5000 - 1010),
        ("vethclient", "RESPONSE", TrafficDirection.INGRESS, True, 5020 - 1000),
    ]
    req, resp = flows[0], flows[3]
    assert req.flow_type == FlowType.L7 and req.time_ns == 1000 + OFFSET
    assert (req.src_ip, req.src_port, req.dst_ip, req.dst_port, req.protocol) == ("10.0.0.1", 40000, "10.0.0.2", 53, UDP)
    assert req.l7 is not None and req.l7.query == "web.example." and list(req.l7.qtypes) == ["A"] and req.l7.rcode == 0
    assert (resp.src_ip, resp.src_port, resp.dst_ip, resp.dst_port) == ("10.0.0.2", 53, "10.0.0.1", 40000)
    dns_info = resp.l7
    assert dns_info is not None
    assert sorted(dns_info.ips) == ["192.0.2.1", "192.0.2.2"] and list(dns_info.cnames) == ["lb.example."]
    assert dns_info.ttl == 60 and list(dns_info.rrtypes) == ["CNAME", "A", "A"] and dns_info.rcode == 0
    c = t.counts
    assert (c.events, c.requests, c.responses, c.unmatched_responses, c.parse_errors) == (4, 2, 2, 0, 0)
    assert len(t.pending) == 0


def test_error_rcodes_are_reported_as_sent() -> None:
    t = tracker()
    events = []
    for i, rcode in enumerate((dns.rcode.NXDOMAIN, dns.rcode.REFUSED, dns.rcode.SERVFAIL, dns.rcode.FORMERR)):
        q = query(f"n{i}.example.", qid=i)
        events.append(event(q.to_wire(), ts=i * 10, ifindex=3, hook=INGRESS, reply=False, sport=1000 + i))
        events.append(event(answer(q, rcode=rcode), ts=i * 10 + 5, ifindex=3, hook=EGRESS, reply=True, sport=1000 + i))
    flows = t.process(events)
    responses = [f for f in flows if f.l7_type == "RESPONSE"]
    assert [f.l7.rcode for f in responses] == [3, 5, 2, 1]  # type: ignore[union-attr]
    assert all(f.latency_ns == 5 for f in responses)


def test_ipv6_and_tcp_exchange() -> None:
    t = tracker()
    q = query("six.example.", "AAAA")
    r = answer(q, dns.rrset.from_text("six.example.", 30, "IN", "AAAA", "2001:db8::1"))
    flows = t.process([
        event(frame(q.to_wire()), ts=10, ifindex=3, hook=INGRESS, reply=False, proto=TCP, v6=True, seq=1),
        event(frame(r), ts=30, ifindex=3, hook=EGRESS, reply=True, proto=TCP, v6=True, seq=7),
    ])
    assert [f.l7_type for f in flows] == ["REQUEST", "RESPONSE"]
    assert flows[1].src_ip == "fd00:f7::3" and flows[1].ip_version == 6 and flows[1].protocol == TCP
    assert flows[1].l7.ips == ("2001:db8::1",) and flows[1].latency_ns == 20  # type: ignore[union-attr]


def test_unanswered_request_is_reported_once_per_observation_point_after_the_timeout() -> None:
    t = tracker(timeout=2)
    q = query("slow.example.").to_wire()
    t.process([event(q, ts=1 * S, ifindex=3, hook=INGRESS, reply=False),
               event(q, ts=1 * S + 7, ifindex=4, hook=EGRESS, reply=False)])
    assert t.expire(3 * S - 1) == []
    out = t.expire(3 * S + 7)
    # Not a second request: its own kind, verdict ERROR and no reply flag.
    assert [(f.ifname, f.kind, f.verdict, f.is_reply, f.l7_type) for f in out] == [
        ("vethclient", EventKind.DNS_UNANSWERED, Verdict.ERROR, None, ""),
        ("vethserver", EventKind.DNS_UNANSWERED, Verdict.ERROR, None, ""),
    ]
    assert out[0].time_ns == 3 * S + OFFSET and out[0].l7.query == "slow.example."  # type: ignore[union-attr]
    assert t.counts.unanswered == 2 and len(t.pending) == 0
    # The answer that comes too late is shown, with no latency, and counted as unmatched.
    late = t.process([event(answer(query("slow.example.")), ts=4 * S, ifindex=3, hook=EGRESS, reply=True)])
    assert late[0].latency_ns == 0 and t.counts.unmatched_responses == 1


def test_capture_shorter_than_the_message_still_gives_header_question_and_whole_answers() -> None:
    t = tracker()
    q = query("many.example.")
    ips = [f"192.0.2.{i}" for i in range(1, 60)]
    r = answer(q, dns.rrset.from_text("many.example.", 20, "IN", "A", *ips))
    assert len(r) > 512
    flows = t.process([event(q.to_wire(), ts=0, ifindex=3, hook=INGRESS, reply=False),
                       event(r, ts=9, ifindex=3, hook=EGRESS, reply=True, capture=512)])
    got = flows[1].l7
    assert got is not None and got.query == "many.example." and got.ttl == 20
    assert 0 < len(got.ips) < len(ips) and set(got.ips) < set(ips)
    assert flows[1].latency_ns == 9
    assert t.counts.truncated == 1 and t.counts.parse_errors == 0


def test_tcp_messages_split_and_pipelined_across_segments() -> None:
    t = tracker()
    big_q = query("big.example.", qid=1)
    big = answer(big_q, dns.rrset.from_text("big.example.", 20, "IN", "A", *[f"198.51.100.{i}" for i in range(1, 120)]))
    small_q = query("small.example.", qid=2)
    small = answer(small_q, dns.rrset.from_text("small.example.", 5, "IN", "A", "203.0.113.7"))
    stream = struct.pack("!H", len(big)) + big + struct.pack("!H", len(small)) + small
    cut1, cut2 = 700, len(big) + 2 - 10  # the second cut leaves 10 bytes of the big message for segment 3
    seq0 = 0xFFFFFF00  # the stream wraps the sequence space on the way
    segments = [(stream[:cut1], 0), (stream[cut1:cut2], cut1), (stream[cut2:], cut2)]
    events = [event(frame(q.to_wire()), ts=1 + i, ifindex=3, hook=INGRESS, reply=False, proto=TCP, seq=5)
              for i, q in enumerate((big_q, small_q))]
    for payload, off in segments:
        events.append(event(payload, ts=10 + off, ifindex=3, hook=EGRESS, reply=True, proto=TCP,
                            seq=(seq0 + off) % (1 << 32)))
    flows = t.process(events)
    responses = [f for f in flows if f.l7_type == "RESPONSE"]
    assert [f.l7.query for f in responses] == ["big.example.", "small.example."]  # type: ignore[union-attr]
    assert list(responses[1].l7.ips) == ["203.0.113.7"]  # type: ignore[union-attr]
    assert all(f.latency_ns > 0 for f in responses)
    c = t.counts
    assert (c.parse_errors, c.truncated, c.tcp_continuations) == (0, 1, 1)


def test_every_malformed_packet_is_one_parse_error_and_nothing_else() -> None:
    t = tracker()
    rng = random.Random(7)
    bad = dnsfuzz.malformed(rng, 2000)
    flows = t.process([event(m, ts=i, ifindex=3, hook=INGRESS, reply=False) for i, m in enumerate(bad)])
    tcp_bad = dnsfuzz.tcp_malformed(rng, 400)
    flows += t.process([event(m, ts=i, ifindex=3, hook=INGRESS, reply=False, proto=TCP, sport=2000 + i, seq=i)
                        for i, m in enumerate(tcp_bad)])
    assert flows == []
    assert t.counts.parse_errors == 2400 and t.counts.requests == 0 and len(t.pending) == 0
    # A truncated capture of garbage is not a readable message either.
    t.process([event(dnsfuzz.random_bytes(rng), ts=0, ifindex=3, hook=INGRESS, reply=False, orig_len=600)])
    assert t.counts.parse_errors == 2401


def test_random_bytes_never_escape_as_exceptions() -> None:
    rng = random.Random(11)
    for _ in range(3000):
        wire = rng.randbytes(rng.randint(0, 300))
        for complete in (True, False):
            try:
                parse_message(wire, complete)
            except MalformedMessage:
                pass
        split_tcp(wire, len(wire) + rng.randint(0, 5))


def test_pending_table_full_is_counted_and_later_responses_are_unmatched() -> None:
    t = tracker(max_pending=16)
    events = [event(query(qid=i).to_wire(), ts=i, ifindex=3, hook=INGRESS, reply=False) for i in range(20)]
    events += [event(answer(query(qid=i)), ts=100 + i, ifindex=3, hook=EGRESS, reply=True) for i in range(20)]
    flows = t.process(events)
    assert len(flows) == 40  # every message is still a flow
    c = t.counts
    assert (c.pending_full, c.unmatched_responses, c.requests, c.responses) == (4, 4, 20, 20)


def test_uplink_interface_direction_and_metric_points() -> None:
    t = tracker()
    q = query()
    flows = t.process([event(q.to_wire(), ts=0, ifindex=9, hook=EGRESS, reply=False),
                       event(a_answer(q), ts=3, ifindex=9, hook=INGRESS, reply=True),
                       event(b"\x00" * 5, ts=4, ifindex=9, hook=INGRESS, reply=True)])
    assert [f.traffic_direction for f in flows] == [TrafficDirection.EGRESS, TrafficDirection.INGRESS]
    points = {p.name: p for p in t.metric_points(123)}
    latency = points.pop("flowtel_dns_latency_seconds")
    assert {n: p.value for n, p in points.items()} == {
        "networkobservability_dns_request_count": 1.0,
        "networkobservability_dns_response_count": 1.0,
        "flowtel_dns_unanswered_total": 0.0,
        "flowtel_dns_parse_errors_total": 1.0,
    }
    assert all(p.kind == MetricKind.SUM and p.attributes == {} and p.time_ns == 123 for p in points.values())
    # The one matched response, 3 ns after its request: in the first bucket.
    assert latency.kind == MetricKind.HISTOGRAM and latency.attributes == {} and latency.time_ns == 123
    assert latency.unit == "s" and latency.count == 1 and latency.value == 3e-9
    assert latency.bucket_counts == (1,) + (0,) * len(DNS_LATENCY_BOUNDS)


def test_latency_histogram_counts_matched_responses_only() -> None:
    t = tracker(timeout=30)
    events = []
    # Latencies 0.3 ms, 1 ms (on a bound: that bucket), 40 ms, 12 s (past the last bound).
    for i, latency_ns in enumerate((300_000, 1_000_000, 40_000_000, 12_000_000_000)):
        q = query(f"h{i}.example.", qid=0x100 + i)
        events.append(event(q.to_wire(), ts=1_000, ifindex=9, hook=EGRESS, reply=False))
        events.append(event(a_answer(q), ts=1_000 + latency_ns, ifindex=9, hook=INGRESS, reply=True))
    stray = query("stray.example.", qid=0x999)  # a response with no request: no latency
    events.append(event(a_answer(stray), ts=5, ifindex=9, hook=INGRESS, reply=True))
    t.process(events)
    h = {p.name: p for p in t.metric_points(7)}["flowtel_dns_latency_seconds"]
    assert h.bounds == DNS_LATENCY_BOUNDS and h.bounds[0] == 0.0005 and h.bounds[-1] == 10.0
    expected = [0] * (len(DNS_LATENCY_BOUNDS) + 1)
    expected[DNS_LATENCY_BOUNDS.index(0.0005)] += 1
    expected[DNS_LATENCY_BOUNDS.index(0.001)] += 1
    expected[DNS_LATENCY_BOUNDS.index(0.05)] += 1
    expected[-1] += 1
    assert list(h.bucket_counts) == expected
    assert h.count == 4 and h.value == pytest.approx(0.0003 + 0.001 + 0.04 + 12)
