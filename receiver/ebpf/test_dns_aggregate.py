"""UDP DNS counted in the kernel: samples, drained aggregates and the kernel's unanswered
requests → flows and counts, without a kernel (the events and map entries are what
bpf/dns.h produces; tests/integration/test_dns_e2e.py checks the kernel side itself)."""
from __future__ import annotations

import random

import dns.message
import dns.rrset

from connectors.hubblemetrics.families.dns import RESPONSES, create
from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import Flow, message_count
from flowtel.lib.bpf.tcattach import Interface
from receiver.ebpf.dns import (
    EXTENSION_QUERY_HASH,
    EXTENSION_UNANSWERED,
    KIND_MESSAGE,
    KIND_NAME,
    MAX_UNANSWERED_FLOWS,
    DnsEvent,
    DnsTracker,
)
from receiver.ebpf.dnstypes import Aggregate, AggKey, Expired, KernelLatency
from tests import dnsfuzz

S = 1_000_000_000
OFFSET = 1_700_000_000 * S
CLIENT = bytes([10, 0, 0, 1]) + bytes(12)
SERVER = bytes([10, 0, 0, 2]) + bytes(12)
IFACES = {3: Interface(3, "vethclient", "veth"), 4: Interface(4, "vethserver", "veth")}
INGRESS, EGRESS = 0, 1
HASH = 0x1234_5678_9ABC_DEF0  # stands for the kernel's FNV-1a of the name
A, AAAA = 1, 28


def tracker() -> DnsTracker:
    return DnsTracker(node_name="node-1", timeout_ns=5 * S, interface_of=IFACES.get,
                      wall_offset_ns=lambda: OFFSET)


def sample(wire: bytes, *, reply: bool, slot: int = 0, ts: int = 1000, sport: int = 40000, latency: int = 0,
           status: int = 0, rcode: int = 0, qtype: int = A, name_hash: int = HASH) -> DnsEvent:
    src, dst, sp, dp = (SERVER, CLIENT, 53, sport) if reply else (CLIENT, SERVER, sport, 53)
    return DnsEvent(ts_ns=ts, ifindex=3, hook=EGRESS if reply else INGRESS, family=4, protocol=17, saddr=src,
                    daddr=dst, sport=sp, dport=dp, orig_len=len(wire), payload=wire, kind=KIND_MESSAGE,
                    latency_ns=latency, name_hash=name_hash, qtype=qtype, server_port=53, slot=slot, status=status,
                    is_response=int(reply), rcode=rcode)


def key(*, reply: bool, rcode: int = 0, status: int = 0, qtype: int = A, name_hash: int = HASH) -> AggKey:
    src, dst = (SERVER, CLIENT) if reply else (CLIENT, SERVER)
    return AggKey(src, dst, name_hash, 3, qtype, 53, 4, EGRESS if reply else INGRESS, int(reply), rcode, status, 17)


def query(qid: int = 7) -> dns.message.Message:
    q = dns.message.make_query("Web.Example.", "A")
    q.id = qid
    return q


def answer(q: dns.message.Message) -> bytes:
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("web.example.", 60, "IN", "A", "192.0.2.1"))
    return r.to_wire()


def test_sampled_messages_are_flows_and_the_rest_one_aggregated_flow_per_key() -> None:
    t = tracker()
    q = query()
    flows = t.process([sample(q.to_wire(), reply=False), sample(answer(q), reply=True, ts=3000, latency=2000)])
    assert [(f.l7_type, f.latency_ns, f.extensions) for f in flows] == [("REQUEST", 0, {}), ("RESPONSE", 2000, {})]
    assert t.counts.requests == t.counts.responses == 0  # the kernel's drain counts them, once
    out = t.reconcile(0, [Aggregate(key(reply=False), 1000, 100, 9000), Aggregate(key(reply=True), 998, 200, 9100)])
    assert [(f.l7_type, f.extensions) for f in out] == [
        ("REQUEST", {"aggregated": True, "count": 999}), ("RESPONSE", {"aggregated": True, "count": 997})]
    req, resp = out
    assert (req.src_ip, req.src_port, req.dst_ip, req.dst_port, req.time_ns) == ("10.0.0.1", 0, "10.0.0.2", 53,
                                                                               9000 + OFFSET)
    assert req.l7 is not None and (req.l7.query, req.l7.qtypes) == ("web.example.", ("A",))  # named by the sample
    assert resp.l7 is not None and (resp.l7.ips, resp.l7.ttl, resp.is_reply) == (("192.0.2.1",), 60, True)
    assert (t.counts.requests, t.counts.responses, t.counts.aggregated) == (1000, 998, 1996)
    # Every message is in exactly one flow.
    assert sum(message_count(f) for f in flows + out if f.l7_type == "REQUEST") == 1000
    # The same slot drained again later starts from nothing.
    assert t.reconcile(0, [Aggregate(key(reply=False), 5, 0, 0)])[0].extensions["count"] == 5


def test_a_key_sampled_whole_yields_no_aggregated_flow_and_slots_are_kept_apart() -> None:
    t = tracker()
    q = query()
    t.process([sample(q.to_wire(), reply=False, slot=1), sample(q.to_wire(), reply=False, slot=0)])
    assert t.reconcile(1, [Aggregate(key(reply=False), 1, 0, 0)]) == []
    assert [f.extensions["count"] for f in t.reconcile(0, [Aggregate(key(reply=False), 3, 0, 0)])] == [2]


def test_kernel_malformed_counts_as_parse_errors_and_dnspython_rejects_are_taken_out_of_the_messages() -> None:
    t = tracker()
    rng = __import__("random").Random(7)
    bad_answers = dnsfuzz.missing_answers(rng)  # header and question fine, records missing
    flows = t.process([sample(bad_answers, reply=True), sample(b"\x01\x02", reply=False, status=1, name_hash=0,
                                                               qtype=0)])
    assert flows == [] and t.last_parse_error
    out = t.reconcile(0, [Aggregate(key(reply=True), 3, 0, 0),
                          Aggregate(key(reply=False, status=1, qtype=0, name_hash=0), 40, 0, 0)])
    # 40 unreadable in the kernel + 1 sample dnspython rejected; the other 2 responses count.
    assert (t.counts.parse_errors, t.counts.responses, t.counts.reclassified) == (41, 2, 1)
    assert [f.extensions["count"] for f in out] == [2]


def test_rejected_sampled_request_is_not_reported_unanswered() -> None:
    t = tracker()
    rng = __import__("random").Random(3)
    bad = dnsfuzz.bad_rdata_length(rng)
    bad = bad[:2] + b"\x01\x00" + bad[4:]  # a request (QR 0) with a bad record
    qid = (bad[0] << 8) | bad[1]
    t.process([sample(bad, reply=False)])
    expired = [Expired(CLIENT, SERVER, 3, 40000, 53, qid, 4, 17, 1000, HASH, A, INGRESS),
               Expired(CLIENT, SERVER, 3, 40001, 53, 9, 4, 17, 1000, HASH, A, INGRESS)]
    out = t.kernel_unanswered(expired)
    assert [f.src_port for f in out] == [40001] and t.counts.unanswered == 1


def test_unanswered_one_flow_each_then_aggregated_and_unknown_names_carry_their_hash() -> None:
    t = tracker()
    n = MAX_UNANSWERED_FLOWS + 10
    expired = [Expired(CLIENT, SERVER, 3, 1000 + i % 60000, 53, i & 0xFFFF, 4, 17, 1000 + i, 0xABC, AAAA, INGRESS)
               for i in range(n)]
    out = t.kernel_unanswered(expired)
    assert t.counts.unanswered == n
    assert len(out) == MAX_UNANSWERED_FLOWS + 1
    single, agg = out[0], out[-1]
    assert single.extensions == {EXTENSION_UNANSWERED: True, EXTENSION_QUERY_HASH: "0000000000000abc"}
    assert single.time_ns == 1000 + 5 * S + OFFSET and single.src_port == 1000
    assert single.l7 is not None and (single.l7.query, single.l7.qtypes) == ("", ("AAAA",))
    assert agg.extensions["count"] == 10 and agg.extensions["aggregated"] is True and agg.src_port == 0
    assert sum(message_count(f) for f in out) == n


def test_the_latency_metric_is_the_kernel_histogram() -> None:
    t = tracker()
    buckets = tuple([0, 3] + [0] * 30)  # 3 exchanges in (0.5 ms, 1 ms]
    latency = [p for p in t.metric_points(0, KernelLatency(buckets, 2_400_000, 3)) if p.name.endswith("seconds")][0]
    assert latency.count == 3 and latency.value == 0.0024 and latency.bucket_counts[:3] == (0, 3, 0)
    assert len(latency.bucket_counts) == len(latency.bounds) + 1


def test_hubble_dns_metrics_count_an_aggregated_flow_as_its_messages() -> None:
    t = tracker()
    q = query()
    t.process([sample(answer(q), reply=True)])
    flows: list[Flow] = t.reconcile(0, [Aggregate(key(reply=True), 50, 0, 0)])
    got: dict[tuple[str, tuple[str, ...]], float] = {}

    def emit(name: str, labels: tuple[str, ...], n: float) -> None:
        got[(name, labels)] = got.get((name, labels), 0) + n

    handler = create({}, ContextOptions())
    for f in flows:
        handler.process(f, emit)
    assert got[(RESPONSES, ("No Error", "A", "1"))] == 49


def test_a_sample_cut_short_by_the_capture_is_reported_in_its_aggregate_not_as_an_error() -> None:
    t = tracker()
    long_name = ".".join(["a" * 40] * 4) + "."
    wire = dns.message.make_query(long_name, "A").to_wire()
    cut = sample(wire, reply=False)
    cut.payload = wire[:64]  # capture_bytes 64: the question runs past it
    assert t.process([cut]) == []
    out = t.reconcile(0, [Aggregate(key(reply=False), 1, 0, 0)])
    assert [f.extensions["count"] for f in out] == [1]
    assert (t.counts.requests, t.counts.parse_errors) == (1, 0)


def test_a_name_sample_names_its_aggregates_and_is_counted_there_only() -> None:
    """Over the budget the kernel sends the first message of a name, qtype and rcode each
    interval as a NAME sample: no flow of its own, its name and answer on every aggregate of
    the name (whatever interface or hook), and its message in the aggregate's count."""
    t = tracker()
    q = query()
    req, resp = sample(q.to_wire(), reply=False), sample(answer(q), reply=True)
    req.kind = resp.kind = KIND_NAME
    assert t.process([req, resp]) == []
    other_hook = AggKey(SERVER, CLIENT, HASH, 4, A, 53, 4, INGRESS, 1, 0, 0, 17)  # the server's veth
    out = t.reconcile(0, [Aggregate(key(reply=False), 5, 0, 0), Aggregate(key(reply=True), 5, 0, 0),
                          Aggregate(other_hook, 5, 0, 0)])
    assert [f.extensions["count"] for f in out] == [5, 5, 5]
    assert all(f.l7 is not None and f.l7.query == "web.example." for f in out)
    assert [f.l7.ips for f in out if f.l7 is not None and f.is_reply] == [("192.0.2.1",), ("192.0.2.1",)]
    assert (t.counts.requests, t.counts.responses, t.counts.names, t.counts.events) == (5, 10, 2, 2)


def test_a_name_sample_dnspython_rejects_is_a_parse_error_not_a_message() -> None:
    t = tracker()
    bad = dnsfuzz.missing_answers(random.Random(7))  # header and question fine: the kernel's OK
    ev = sample(bad, reply=True)  # a response whose answer count promises records it lacks
    ev.kind = KIND_NAME
    assert t.process([ev]) == [] and t.last_parse_error
    out = t.reconcile(0, [Aggregate(key(reply=True), 3, 0, 0)])
    assert [f.extensions["count"] for f in out] == [2]
    assert (t.counts.responses, t.counts.parse_errors, t.counts.reclassified) == (2, 1, 1)


def test_aggregated_flows_are_rebuilt_when_their_name_or_answer_changes() -> None:
    """Each key's record is built once and reused drain after drain (only time and count
    change), until the name or the answer it shows does."""
    t = tracker()
    unnamed = t.reconcile(0, [Aggregate(key(reply=True), 4, 0, 10)])[0]
    assert unnamed.l7 is not None and unnamed.l7.query == "" and unnamed.extensions[EXTENSION_QUERY_HASH]
    q = query()
    name = sample(q.to_wire(), reply=False)
    name.kind = KIND_NAME
    t.process([name])  # a request: its name only
    named = t.reconcile(1, [Aggregate(key(reply=True), 4, 0, 20)])[0]
    assert named.l7 is not None and (named.l7.query, named.l7.ips) == ("web.example.", ())
    assert EXTENSION_QUERY_HASH not in named.extensions
    again = t.reconcile(0, [Aggregate(key(reply=True), 7, 0, 30)])[0]
    assert again.l7 is named.l7 and (again.extensions["count"], again.time_ns) == (7, 30 + OFFSET)
    resp = sample(answer(q), reply=True)
    resp.kind = KIND_NAME
    t.process([resp])
    answered = t.reconcile(1, [Aggregate(key(reply=True), 2, 0, 40)])[0]
    assert answered.l7 is not None and (answered.l7.ips, answered.l7.ttl) == (("192.0.2.1",), 60)
    assert answered.wire_memo is not again.wire_memo  # each record encodes on its own


def test_a_bare_query_is_reported_as_dnspython_reads_it_without_a_parse() -> None:
    """A QUERY with its question and nothing else is all checked by the kernel: its flow
    comes from the question alone, the same l7 as dnspython's (escapes included)."""
    for name in ("Web.Example.", "we ird.a\\.b.example."):
        q = dns.message.make_query(name, "AAAA", use_edns=False)
        t = tracker()
        (flow,) = t.process([sample(q.to_wire(), reply=False, qtype=AAAA)])
        with_edns = dns.message.make_query(name, "AAAA", use_edns=0)  # an OPT record: dnspython reads it
        (parsed,) = tracker().process([sample(with_edns.to_wire(), reply=False, qtype=AAAA)])
        assert flow.l7 == parsed.l7 and flow.l7 is not None and flow.l7.qtypes == ("AAAA",)
        assert (flow.l7_type, flow.src_port, flow.dst_port) == ("REQUEST", 40000, 53)
        # It names the key's aggregate, and counts once there.
        (agg,) = t.reconcile(0, [Aggregate(key(reply=False, qtype=AAAA), 3, 0, 0)])
        assert agg.l7 is not None and agg.l7.query == flow.l7.query and agg.extensions["count"] == 2
