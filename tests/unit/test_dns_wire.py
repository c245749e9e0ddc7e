"""The DNS wire reader against dnspython's own parser, and its handling of partial captures."""
from __future__ import annotations

import random
import struct

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from receiver.ebpf.dnswire import MalformedMessage, parse_message, split_tcp


def _summary_by_dnspython(wire: bytes) -> tuple | None:
    try:
        m = dns.message.from_wire(wire, keyring=False, ignore_trailing=True)
    except Exception:
        return None
    return (
        m.id, bool(m.flags & 0x8000), m.rcode(),
        m.question[0].name.to_text().lower() if m.question else "",
        [dns.rdatatype.to_text(q.rdtype) for q in m.question],
        # dnspython merges repeated records into one rdataset; flowtel lists them as sent.
        sorted({rd.address for rr in m.answer if rr.rdtype in (1, 28) and rr.rdclass == 1 for rd in rr}),
        sorted({rd.target.to_text().lower() for rr in m.answer if rr.rdtype == 5 for rd in rr}),
        min((rr.ttl for rr in m.answer), default=0),
    )


def _summary(wire: bytes) -> tuple | None:
    try:
        m = parse_message(wire, True)
    except MalformedMessage:
        return None
    return (m.id, m.is_response, m.rcode, m.query, m.qtypes, sorted(set(m.ips)), sorted(set(m.cnames)), m.ttl)


def _samples() -> list[bytes]:
    q = dns.message.make_query("Host1.Example.", "A", id=0x1234)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("host1.example.", 300, "IN", "CNAME", "lb.example."))
    r.answer.append(dns.rrset.from_text("lb.example.", 60, "IN", "A", "192.0.2.1", "192.0.2.2"))
    r.authority.append(dns.rrset.from_text("example.", 30, "IN", "NS", "ns.example."))
    qe = dns.message.make_query("api.internal.svc.cluster.local.", "AAAA", use_edns=0, id=0x5678)
    re_ = dns.message.make_response(qe)
    re_.answer.append(dns.rrset.from_text("api.internal.svc.cluster.local.", 30, "IN", "AAAA", "2001:db8::7"))
    nx = dns.message.make_response(dns.message.make_query("nope.example.", "MX", id=0x9ABC))
    nx.set_rcode(dns.rcode.NXDOMAIN)
    return [q.to_wire(), r.to_wire(), qe.to_wire(), re_.to_wire(), nx.to_wire()]


def test_reads_what_dnspython_reads_and_rejects_nothing_it_accepts() -> None:
    rng = random.Random(5)
    samples = _samples()
    for wire in samples:
        assert _summary(wire) == _summary_by_dnspython(wire) is not None
    accepted = 0
    for _ in range(20000):
        w = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 3)):
            w[rng.randrange(len(w))] = rng.getrandbits(8)
        if rng.random() < 0.3:
            del w[rng.randrange(len(w)):]
        wire = bytes(w)
        theirs = _summary_by_dnspython(wire)
        if theirs is not None:
            accepted += 1
            assert _summary(wire) == theirs, wire.hex()
    assert accepted > 1000  # the comparison covered a real share of mutated messages


def test_extended_rcode_from_edns() -> None:
    q = dns.message.make_query("x.example.", "A", use_edns=0)
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.BADVERS)  # 16: needs the OPT record's upper bits
    assert parse_message(r.to_wire(), True).rcode == 16


def test_a_record_of_another_class_is_not_an_address() -> None:
    q = dns.message.make_query("x.example.", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("x.example.", 30, "IN", "A", "192.0.2.9"))
    wire = bytearray(r.to_wire())
    wire[-12:-10] = struct.pack("!H", 3)  # the record's class (before TTL, length, 4 data bytes): CHAOS
    m = parse_message(bytes(wire), True)
    assert m.ips == [] and m.rrtypes == ["A"]


def test_partial_capture_needs_header_and_first_question_only() -> None:
    wire = _samples()[1]
    for cut in range(12, len(wire)):
        head = wire[:cut]
        with pytest.raises(MalformedMessage):
            parse_message(head, True)  # claimed complete, it is short
        try:
            m = parse_message(head, False)
        except MalformedMessage:
            assert cut < 12 + len(b"\x05host1\x07example\x00") + 4  # the question was cut
            continue
        assert m.partial and m.query == "host1.example." and m.qtypes == ["A"]
        assert set(m.ips) <= {"192.0.2.1", "192.0.2.2"}


@pytest.mark.parametrize("wire, reason", [
    (b"", "shorter than a DNS header"),
    (b"\x00" * 11, "shorter than a DNS header"),
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", "does not point backwards"),
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x40abc\x00\x00\x01\x00\x01", "label type"),
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f"
     + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x00\x00\x01\x00\x01", "longer than 255"),
    (b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01", "runs past the end"),
])
def test_malformed_messages_say_why(wire: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        parse_message(wire, True)


def test_tcp_framing() -> None:
    m1, m2 = _samples()[0], _samples()[2]
    stream = struct.pack("!H", len(m1)) + m1 + struct.pack("!H", len(m2)) + m2
    whole = split_tcp(stream, len(stream))
    assert whole.messages == [(m1, True), (m2, True)] and whole.continues_at is None and not whole.error
    # The segment ends inside the second message; the capture ends inside the first.
    seg = stream[: len(m1) + 10]
    cut = split_tcp(seg[:20], len(seg))
    assert cut.messages == [(m1[:18], False)] and cut.continues_at is None
    part = split_tcp(seg, len(seg))
    assert part.messages == [(m1, True), (m2[:6], False)] and part.continues_at == len(stream)
    # Starting after the bytes of a message that began in an earlier segment.
    assert split_tcp(stream, len(stream), start=2 + len(m1)).messages == [(m2, True)]
    assert split_tcp(b"\x00\x05" + bytes(5), 7).error.startswith("TCP length prefix 5")
    assert split_tcp(b"\x00", 1).error == "segment ends inside a TCP length prefix"
