"""What the proxy reads from DNS messages (dnsproxy/wire.py): dnspython's reading, kept per
distinct message. A cached reading must be exactly what a fresh parse gives, whatever the ID."""
from __future__ import annotations

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rdataclass
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.update
import pytest

from dnsproxy import wire
from dnsproxy.wire import BoundedCache, parse_answer, parse_query


def _answer(query: dns.message.Message, *records: tuple[str, int, str, str]) -> dns.message.Message:
    resp = dns.message.make_response(query)
    for name, ttl, rtype, value in records:
        resp.answer.append(dns.rrset.from_text(name, ttl, "IN", rtype, value))
    return resp


def test_repeated_query_with_another_id_is_read_once_and_answered_with_its_own_id() -> None:
    q1 = dns.message.make_query("Api.Example.TEST", "AAAA", use_edns=0)
    q2 = dns.message.make_query("Api.Example.TEST", "AAAA", use_edns=0)
    q1.id, q2.id = 0x1111, 0x2222
    a, b = parse_query(q1.to_wire()), parse_query(q2.to_wire())
    assert a is b  # the second one came from the cache
    assert (a.qname, a.qtype, a.question) == ("Api.Example.TEST.", "AAAA", ("api.example.test", 28, 1))
    for q in (q1, q2):
        refused = dns.message.from_wire(a.rcode_response(q.to_wire()[:2], dns.rcode.REFUSED))
        # As dnspython's own make_response to that very query: ID, question, EDNS, rcode.
        expected = dns.message.make_response(q)
        expected.set_rcode(dns.rcode.REFUSED)
        assert refused == expected and refused.id == q.id and refused.edns == 0


def test_answer_reading_follows_cnames_and_is_cached_per_message() -> None:
    q = dns.message.make_query("www.allowed.test", "A")
    resp = _answer(q, ("www.allowed.test.", 300, "CNAME", "edge.cdn.test."), ("edge.cdn.test.", 60, "A", "192.0.2.7"),
                   ("other.test.", 5, "A", "192.0.2.99"))
    w1 = resp.to_wire()
    resp.id ^= 0xFFFF
    w2 = resp.to_wire()
    a1, a2 = parse_answer(w1), parse_answer(w2)
    assert a1 is a2
    assert (a1.ips, a1.ttl, a1.cnames, a1.rcode) == (("192.0.2.7",), 60, ("edge.cdn.test",), dns.rcode.NOERROR)
    assert a1.answers(parse_query(q.to_wire()))


def test_an_answer_to_another_question_or_a_query_is_not_taken() -> None:
    asked = parse_query(dns.message.make_query("api.allowed.test", "A").to_wire())
    other = dns.message.make_query("evil.test", "A")
    assert not parse_answer(_answer(other, ("evil.test.", 60, "A", "192.0.2.66")).to_wire()).answers(asked)
    aaaa = dns.message.make_query("api.allowed.test", "AAAA")
    assert not parse_answer(_answer(aaaa).to_wire()).answers(asked)  # same name, other type
    query_back = dns.message.make_query("api.allowed.test", "A")  # QR bit clear: not an answer
    assert not parse_answer(query_back.to_wire()).answers(asked)
    # Case differs (0x20 randomisation by a resolver): still the same question.
    upper = dns.message.make_query("API.ALLOWED.TEST", "A")
    assert parse_answer(_answer(upper, ("API.ALLOWED.TEST.", 60, "A", "192.0.2.1")).to_wire()).answers(asked)
    # An error answer may leave the question out (as dnspython's is_response accepts); NOERROR may not.
    bare = dns.message.Message(id=1)
    bare.flags = dns.flags.QR
    bare.set_rcode(dns.rcode.SERVFAIL)
    assert parse_answer(bare.to_wire()).answers(asked)
    bare.set_rcode(dns.rcode.NOERROR)
    assert not parse_answer(bare.to_wire()).answers(asked)


def test_not_dns_raises_and_large_messages_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(dns.exception.DNSException):
        parse_query(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00garbage-not-dns")
    assert (wire.header_only_formerr(b"\x12\x34" + bytes(10)) or b"")[:4] == b"\x12\x34\x80\x01"
    assert wire.header_only_formerr(b"short") is None
    fresh: BoundedCache[bytes, wire.Answer] = BoundedCache()
    monkeypatch.setattr(wire, "_answers", fresh)
    q = dns.message.make_query("many.test", "A")
    big = _answer(q, *(("many.test.", 60, "A", f"192.0.2.{i}") for i in range(1, 120)))
    assert len(big.to_wire()) > wire.MAX_CACHED_MESSAGE
    assert len(parse_answer(big.to_wire()).ips) == 119 and len(fresh) == 0
    assert parse_answer(_answer(q, ("many.test.", 60, "A", "192.0.2.1")).to_wire()).ips == ("192.0.2.1",)
    assert len(fresh) == 1


def test_bounded_cache_evicts_the_oldest() -> None:
    c: BoundedCache[int, str] = BoundedCache(3)
    for i in range(5):
        c.put(i, str(i))
    assert len(c) == 3 and c.get(0) is None and c.get(1) is None and c.get(4) == "4"


def _two_questions() -> bytes:
    q = dns.message.make_query("allowed.test", "A")
    q.question.append(dns.rrset.RRset(dns.name.from_text("denied.test"), dns.rdataclass.IN, dns.rdatatype.A))
    return q.to_wire()


def _update() -> bytes:
    u = dns.update.UpdateMessage("allowed.test")
    u.add("denied", 60, "TXT", "exfiltrated")
    return u.to_wire()


def _with(section: str) -> bytes:
    q = dns.message.make_query("allowed.test", "A")
    getattr(q, section).append(dns.rrset.from_text("denied.test.", 60, "IN", "TXT", "smuggled"))
    return q.to_wire()


def _response() -> bytes:
    return dns.message.make_response(dns.message.make_query("allowed.test", "A")).to_wire()


def _notify() -> bytes:
    q = dns.message.make_query("allowed.test", "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    return q.to_wire()


@pytest.mark.parametrize(("make", "reason", "rcode"), [
    (_two_questions, "question_count", dns.rcode.FORMERR),
    (lambda: dns.message.Message().to_wire(), "question_count", dns.rcode.FORMERR),  # no question
    (_update, "opcode", dns.rcode.REFUSED),
    (_notify, "opcode", dns.rcode.REFUSED),
    (_response, "response", None),  # QR set: dropped, never answered (no reflection loop)
    (lambda: _with("answer"), "records", dns.rcode.FORMERR),
    (lambda: _with("authority"), "records", dns.rcode.FORMERR),
    (lambda: _with("additional"), "records", dns.rcode.FORMERR),
    (lambda: b"\x00\x01\x80", "malformed", None),
])
def test_only_single_question_standard_queries_parse(make: object, reason: str, rcode: int | None) -> None:
    with pytest.raises(wire.BadQuery) as err:
        parse_query(make())  # type: ignore[operator]
    assert (err.value.reason, err.value.rcode) == (reason, rcode)


def test_edns_queries_parse() -> None:
    q = dns.message.make_query("allowed.test", "A", use_edns=0, payload=1232)
    assert parse_query(q.to_wire()).qname == "allowed.test."
