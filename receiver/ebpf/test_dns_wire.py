"""DNS messages read through dnspython: the fields a flow shows, partial captures, and
malformed messages rejected with dnspython's reason."""
from __future__ import annotations

import random
import struct

import dns.message
import dns.rcode
import dns.rrset
import dns.tsigkeyring
import pytest

from receiver.ebpf.dnswire import DnsMessage, MalformedMessage, parse_message, parse_shared, question_name
from tests import dnsfuzz


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


def test_valid_messages_give_the_fields_a_flow_shows() -> None:
    q, r, qe, re_, nx = _samples()
    assert parse_message(q, True) == DnsMessage(id=0x1234, is_response=False, rcode=0, query="host1.example.",
                                                qtypes=["A"])
    # Records as sent: one per record, in wire order (a CNAME chain, then both addresses,
    # in the order dnspython wrote its rdataset).
    m = parse_message(r, True)
    assert sorted(m.ips) == ["192.0.2.1", "192.0.2.2"]
    assert m == DnsMessage(id=0x1234, is_response=True, rcode=0, query="host1.example.", qtypes=["A"], ips=m.ips,
                           cnames=["lb.example."], rrtypes=["CNAME", "A", "A"], ttl=60)
    assert parse_message(qe, True) == DnsMessage(id=0x5678, is_response=False, rcode=0,
                                                 query="api.internal.svc.cluster.local.", qtypes=["AAAA"])
    assert parse_message(re_, True) == DnsMessage(
        id=0x5678, is_response=True, rcode=0, query="api.internal.svc.cluster.local.", qtypes=["AAAA"],
        ips=["2001:db8::7"], rrtypes=["AAAA"], ttl=30)
    assert parse_message(nx, True) == DnsMessage(id=0x9ABC, is_response=True, rcode=3, query="nope.example.",
                                                 qtypes=["MX"])


@pytest.mark.parametrize("name", ["Host1.Example.", "_sip._tcp.A-B.example.", ".", "a\\.b.example.",
                                  "sp ace.example.", "x\\255y.example.", "at\\@sign.", "q\\\"uote.", "a" * 63 + "."])
def test_question_name_alone_reads_as_the_whole_message_does(name: str) -> None:
    wire = dns.message.make_query(name, "A", id=0x4321).to_wire()
    assert question_name(wire) == parse_message(wire, True).query


def test_question_name_of_a_cut_name_is_malformed() -> None:
    wire = dns.message.make_query("long-label.example.", "A").to_wire()
    with pytest.raises(MalformedMessage):
        question_name(wire[:18])


def test_messages_that_differ_only_in_their_id_share_one_parse() -> None:
    a = dns.message.make_query("shared.example.", "A", id=1).to_wire()
    b = dns.message.make_query("shared.example.", "A", id=2).to_wire()
    assert parse_shared(a, True) is parse_shared(b, True) and parse_shared(a, True).id == 0
    assert parse_message(b, True).id == 2


def test_repeated_records_and_trailing_bytes() -> None:
    # dnspython cannot write a repeated record, so the second copy is spliced in by hand.
    q = dns.message.make_query("x.example.", "A", id=7)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("x.example.", 30, "IN", "A", "192.0.2.9"))
    wire = bytearray(r.to_wire())
    record = wire[-16:]  # pointer, type, class, TTL, length, 4 address bytes
    wire[6:8] = struct.pack("!H", 2)
    wire += record + b"junk after the last record"
    m = parse_message(bytes(wire), True)
    assert list(m.ips) == ["192.0.2.9", "192.0.2.9"] and list(m.rrtypes) == ["A", "A"] and m.ttl == 30


def test_tsig_signed_messages_are_read_not_validated() -> None:
    q = dns.message.make_query("x.example.", "A", id=9)
    q.use_tsig(dns.tsigkeyring.from_text({"key.example.": "c2VjcmV0c2VjcmV0c2VjcmV0"}), keyname="key.example.")
    m = parse_message(q.to_wire(), True)
    assert (m.id, m.query, m.qtypes) == (9, "x.example.", ["A"])


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
    # The record's class (before TTL, length, 4 data bytes): HS. (Not CHAOS: a CH-class A
    # is a name and a 16-bit address, RFC 1035 section 3.4.1's "class-dependent" format.)
    wire[-12:-10] = struct.pack("!H", 4)
    m = parse_message(bytes(wire), True)
    assert list(m.ips) == [] and list(m.rrtypes) == ["A"]


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
        assert m.partial and m.query == "host1.example." and list(m.qtypes) == ["A"]
        assert set(m.ips) <= {"192.0.2.1", "192.0.2.2"}


def test_partial_capture_skips_a_record_whose_data_are_malformed() -> None:
    # dnspython's continue_on_error: the bad record is passed over by its length, and the
    # whole records around it are kept; the capture then ends inside the third record.
    question = b"\x01a\x00\x00\x01\x00\x01"
    bad = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x05\x01\x02\x03\x04\x05"
    good = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x07"
    wire = b"\x12\x34\x81\x80\x00\x01\x00\x03\x00\x00\x00\x00" + question + bad + good + good[:9]
    with pytest.raises(MalformedMessage):
        parse_message(wire, True)
    m = parse_message(wire, False)
    assert m.partial and m.query == "a." and list(m.ips) == ["192.0.2.7"] and m.ttl == 60


@pytest.mark.parametrize("wire, reason", [
    (b"", "shorter than a DNS header"),
    (b"\x00" * 11, "shorter than a DNS header"),
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", "BadPointer"),
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x40abc\x00\x00\x01\x00\x01", "BadLabelType"),
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f"
     + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x00\x00\x01\x00\x01", "NameTooLong"),
    (b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01", "FormError"),
    # An A record of 5 bytes.
    (b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01"
     b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x05\x01\x02\x03\x04\x05", "FormError"),
])
def test_malformed_messages_say_why(wire: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        parse_message(wire, True)


@pytest.mark.parametrize("kind", dnsfuzz.GENERATORS, ids=lambda g: g.__name__)
def test_every_fuzz_kind_is_rejected(kind) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(kind.__name__)
    for _ in range(300):
        wire = kind(rng)
        with pytest.raises(MalformedMessage):
            parse_message(wire, True)


def test_question_name_longer_than_dns_allows_is_malformed_as_dnspython_says() -> None:
    # Five 63-byte labels of plain letters: 321 bytes on the wire, over DNS's 255. The fast
    # path must not accept what dnspython refuses (a hostile pod sends what it likes).
    labels = b"".join(bytes([63]) + b"a" * 63 for _ in range(5))
    wire = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01"
    with pytest.raises(MalformedMessage):
        question_name(wire)
