"""dnswire's fast path against dnspython, the reference: over real messages, crafted hostile
ones and random mutations of both, the fast path gives exactly dnspython's fields or declines
(None, and dnspython reads the message); it never accepts what dnspython rejects. It must
also accept the common shapes, or it would save nothing."""
from __future__ import annotations

import random
import struct

import dns.edns
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from receiver.ebpf import dnswire
from receiver.ebpf.dnswire import DnsMessage, MalformedMessage
from tests import dnsfuzz

HDR = struct.Struct("!HHHHHH")


def _reference(wire: bytes) -> DnsMessage | str:
    try:
        return dnswire._dnspython_parse(wire, True)
    except MalformedMessage as exc:
        return f"malformed: {exc}"


def _agrees(wire: bytes) -> bool:
    """Whether the fast path agreed (True) or declined (False); fails if it differs."""
    wire = b"\x00\x00" + wire[2:]
    fast = dnswire._fast_parse(wire)
    if fast is None:
        return False
    assert fast == _reference(wire), wire.hex()
    return True


def _response(name: str, qtype: str, *rrs: tuple[str, int, str, str, str], edns: bool = False,
              rcode: int = 0, authority: tuple[tuple[str, int, str, str, str], ...] = (),
              additional: tuple[tuple[str, int, str, str, str], ...] = ()) -> bytes:
    q = dns.message.make_query(name, qtype, use_edns=0 if edns else None)
    r = dns.message.make_response(q)
    for section, records in ((r.answer, rrs), (r.authority, authority), (r.additional, additional)):
        for owner, ttl, cls, rtype, data in records:
            section.append(dns.rrset.from_text(owner, ttl, cls, rtype, data))
    if rcode:
        r.set_rcode(rcode)
    return r.to_wire()


# Shapes the fast path is for: each must be read by it, and equal dnspython's reading.
COMMON = {
    "query": dns.message.make_query("svc1.ns1.bench.local.", "A").to_wire(),
    "query with EDNS": dns.message.make_query("Api.Internal.svc.cluster.local.", "AAAA", use_edns=0).to_wire(),
    "A answer": _response("svc1.ns1.bench.local.", "A", ("svc1.ns1.bench.local.", 0, "IN", "A", "198.51.100.2")),
    "two A, EDNS": _response("x.example.", "A", ("x.example.", 30, "IN", "A", "192.0.2.1"),
                             ("x.example.", 20, "IN", "A", "192.0.2.2"), edns=True),
    "CNAME chain": _response("www.Example.com.", "A", ("www.example.com.", 300, "IN", "CNAME", "lb.example.net."),
                             ("lb.example.net.", 60, "IN", "CNAME", "edge.cdn.example."),
                             ("edge.cdn.example.", 20, "IN", "A", "203.0.113.9")),
    "AAAA forms": _response("v6.example.", "AAAA", *[("v6.example.", 5, "IN", "AAAA", a) for a in (
        "2001:db8::7", "::", "::1", "::ffff:192.0.2.1", "1::", "2001:db8:0:0:1:0:0:1", "fe80::1:0:0:0")]),
    "NXDOMAIN with SOA": _response("nope.example.", "A", rcode=dns.rcode.NXDOMAIN, authority=(
        ("example.", 900, "IN", "SOA", "ns1.example. hostmaster.example. 2026120701 7200 900 1209600 86400"),)),
    "NODATA with SOA": _response("x.example.", "MX", authority=(
        ("example.", 900, "IN", "SOA", "ns1.example. hostmaster.example. 1 2 3 4 5"),)),
    "NS and glue": _response("a.example.", "A", ("a.example.", 60, "IN", "A", "192.0.2.3"),
                             authority=(("example.", 3600, "IN", "NS", "ns1.example."),),
                             additional=(("ns1.example.", 3600, "IN", "A", "192.0.2.53"),
                                         ("ns1.example.", 3600, "IN", "AAAA", "2001:db8::53"))),
    "BADVERS (extended rcode)": _response("x.example.", "A", edns=True, rcode=dns.rcode.BADVERS),
    "TTL over 2^31": _response("t.example.", "A", ("t.example.", 0x80000000, "IN", "A", "192.0.2.4"),
                               ("t.example.", 7, "IN", "A", "192.0.2.5")),
    "root query": dns.message.make_query(".", "NS").to_wire(),
    "SRV-style name": _response("_sip._tcp.a-b.example.", "A", ("_sip._tcp.a-b.example.", 1, "IN", "A", "192.0.2.6")),
    "255-byte name": dns.message.make_query(".".join(["a" * 63] * 3 + ["b" * 61]) + ".", "A").to_wire(),
}


@pytest.mark.parametrize("label", list(COMMON))
def test_common_shapes_take_the_fast_path_and_equal_dnspython(label: str) -> None:
    assert _agrees(COMMON[label]), f"{label}: the fast path declined a shape it is for"


def test_through_parse_message_the_result_is_the_same() -> None:
    for wire in COMMON.values():
        assert dnswire.parse_message(wire, True) == _with_id(_reference(b"\x00\x00" + wire[2:]), wire)


def _with_id(ref: DnsMessage | str, wire: bytes) -> DnsMessage:
    assert isinstance(ref, DnsMessage)
    ref.id = (wire[0] << 8) | wire[1]
    return ref


def _q(name: bytes = b"\x01a\x07example\x00", qtype: int = 1) -> bytes:
    return name + struct.pack("!HH", qtype, 1)


def _rr(owner: bytes, rtype: int, data: bytes, cls: int = 1, ttl: int = 60, rdlen: int | None = None) -> bytes:
    return owner + struct.pack("!HHIH", rtype, cls, ttl, len(data) if rdlen is None else rdlen) + data


RESP = 0x8180
A = _rr(b"\xc0\x0c", 1, b"\xc0\x00\x02\x01")

# Hostile and unusual messages: the fast path must decline or agree; dnspython's verdict is
# what counts (most are malformed, some are valid shapes the fast path leaves to it).
HOSTILE = {
    "pointer to itself (question)": HDR.pack(0, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",
    "two-pointer loop": HDR.pack(0, 0x0100, 1, 0, 0, 0) + b"\xc0\x0e\xc0\x0c\x00\x01\x00\x01",
    "pointer into the header": HDR.pack(0, 0x0100, 1, 0, 0, 0) + b"\xc0\x02\x00\x01\x00\x01",
    "answer owner pointing forward": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x30", 1, b"\x01\x02\x03\x04"),
    "answer owner pointing at itself": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x1d", 1, b"\x01\x02\x03\x04"),
    "pointer loop via two owners": HDR.pack(0, RESP, 1, 2, 0, 0) + _q()
    + _rr(b"\x01b\xc0\x2f", 1, b"\x01\x02\x03\x04") + _rr(b"\xc0\x1d", 1, b"\x01\x02\x03\x04"),
    "CNAME target pointing forward": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x0c", 5, b"\xc0\x40"),
    "CNAME target pointing into its own rdata": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x0c", 5, b"\x01x\xc0\x29"),
    "CNAME rdata longer than its name": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x0c", 5, b"\xc0\x0cxx"),
    "CNAME name runs past its rdata": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x0c", 5, b"\x03abc\x00",
                                                                                 rdlen=3),
    "valid backward chain": HDR.pack(0, RESP, 1, 2, 0, 0) + _q()
    + _rr(b"\xc0\x0c", 5, b"\x03cdn\xc0\x0e") + _rr(b"\xc0\x27", 1, b"\x01\x02\x03\x04"),
    "A of 5 bytes": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x0c", 1, b"\x01\x02\x03\x04\x05"),
    "AAAA of 4 bytes": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x0c", 28, b"\x01\x02\x03\x04"),
    "rdlength past the end": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x0c", 1, b"\x01\x02", rdlen=4),
    "missing answers": HDR.pack(0, RESP, 1, 3, 0, 0) + _q() + A,
    "class CH A (a name and an address)": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x0c", 1, b"\xc0\x0c\x00\x01", cls=3),
    "class HS A": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x0c", 1, b"\x01\x02\x03\x04", cls=4),
    "OPT in the answer section": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\x00", 41, b"", cls=1232),
    "two OPTs": HDR.pack(0, RESP, 1, 0, 0, 2) + _q() + _rr(b"\x00", 41, b"", cls=1232) * 2,
    "OPT not owned by the root": HDR.pack(0, RESP, 1, 0, 0, 1) + _q() + _rr(b"\xc0\x0c", 41, b"", cls=1232),
    "OPT owned by a pointer to the root": HDR.pack(0, RESP, 1, 0, 0, 1) + _q(b"\x00") + _rr(b"\xc0\x0c", 41, b""),
    "OPT with a cookie option": HDR.pack(0, RESP, 1, 0, 0, 1) + _q() + _rr(b"\x00", 41, b"\x00\x0a\x00\x08" + b"c" * 8),
    "OPT with a bad ECS option": HDR.pack(0, RESP, 1, 0, 0, 1) + _q() + _rr(b"\x00", 41, b"\x00\x08\x00\x02\x00\x09"),
    "OPT with extended rcode 0xff": HDR.pack(0, RESP | 0xF, 1, 0, 0, 1) + _q() + _rr(b"\x00", 41, b"", ttl=0xFF000000),
    "TSIG in the answers": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\x00", 250, b"\x00" * 10, cls=255),
    "SOA cut short": HDR.pack(0, RESP, 1, 0, 1, 0) + _q() + _rr(b"\xc0\x0e", 6, b"\x00\x00" + b"\x00" * 19),
    "SOA with extra bytes": HDR.pack(0, RESP, 1, 0, 1, 0) + _q() + _rr(b"\xc0\x0e", 6, b"\x00\x00" + b"\x00" * 21),
    "MX answer (left to dnspython)": HDR.pack(0, RESP, 1, 1, 0, 0) + _q(qtype=15) + _rr(b"\xc0\x0c", 15, b"\x00\x0a\xc0\x0c"),
    "escaped label in the question": HDR.pack(0, 0x0100, 1, 0, 0, 0) + _q(b"\x03a.b\x00"),
    "space in a CNAME target": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\xc0\x0c", 5, b"\x03a b\x00"),
    "8-bit label": HDR.pack(0, RESP, 1, 1, 0, 0) + _q(b"\x02\xc3\xa9\x00"),
    "reserved label type 0x40": HDR.pack(0, 0x0100, 1, 0, 0, 0) + _q(b"\x41abc\x00"),
    "reserved label type 0x80 in an owner": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + _rr(b"\x80", 1, b"\x01\x02\x03\x04"),
    "256-byte name": HDR.pack(0, 0x0100, 1, 0, 0, 0) + _q(b"".join(b"\x3f" + b"a" * 63 for _ in range(3))
                                                          + b"\x3e" + b"b" * 62 + b"\x00"),
    "256-byte name via a pointer": HDR.pack(0, RESP, 1, 1, 0, 0)
    + _q(b"".join(b"\x3f" + b"a" * 63 for _ in range(3)) + b"\x3d" + b"b" * 61 + b"\x00")
    + _rr(b"\x01c\xc0\x0c", 1, b"\x01\x02\x03\x04"),
    "opcode UPDATE": HDR.pack(0, 0x2800, 1, 0, 0, 0) + _q(),
    "two questions": HDR.pack(0, 0x0100, 2, 0, 0, 0) + _q() + _q(),
    "no question": HDR.pack(0, RESP, 0, 1, 0, 0) + _rr(b"\x00", 1, b"\x01\x02\x03\x04"),
    "trailing junk": HDR.pack(0, RESP, 1, 1, 0, 0) + _q() + A + b"junk",
}


def _chain(records: int) -> bytes:
    """A response whose k-th answer is owned by "y" and a pointer to the (k-1)-th's owner (the
    first's to the question's root name): the k-th owner takes k compression hops."""
    wire = bytearray(HDR.pack(0, RESP, 1, records, 0, 0) + _q(b"\x00"))
    prev = 12
    for _ in range(records):
        here = len(wire)
        wire += _rr(b"\x01y" + struct.pack("!H", 0xC000 | prev), 1, b"\x01\x02\x03\x04")
        prev = here
    return bytes(wire)


HOSTILE["16 hops"] = _chain(16)
HOSTILE["17 hops"] = _chain(17)


@pytest.mark.parametrize("label", list(HOSTILE))
def test_hostile_and_unusual_messages_agree_or_decline(label: str) -> None:
    wire = HOSTILE[label]
    ref = _reference(b"\x00\x00" + wire[2:])
    if _agrees(wire):
        assert isinstance(ref, DnsMessage)


def test_hostile_cases_that_must_be_declined() -> None:
    # The fast path's own checks, not only dnspython's: each of these is malformed (or needs
    # dnspython's reading), so the fast path must not have returned anything for it.
    for label in ("pointer to itself (question)", "two-pointer loop", "pointer into the header",
                  "answer owner pointing forward", "answer owner pointing at itself", "pointer loop via two owners",
                  "CNAME target pointing forward", "CNAME target pointing into its own rdata",
                  "CNAME rdata longer than its name", "CNAME name runs past its rdata", "A of 5 bytes",
                  "AAAA of 4 bytes", "rdlength past the end", "missing answers", "class CH A (a name and an address)",
                  "OPT in the answer section", "two OPTs", "OPT not owned by the root", "OPT with a bad ECS option",
                  "TSIG in the answers", "SOA cut short", "SOA with extra bytes", "reserved label type 0x40",
                  "reserved label type 0x80 in an owner", "256-byte name", "256-byte name via a pointer",
                  "opcode UPDATE", "escaped label in the question", "space in a CNAME target", "8-bit label",
                  "17 hops"):
        assert dnswire._fast_parse(b"\x00\x00" + HOSTILE[label][2:]) is None, label
    assert _agrees(HOSTILE["valid backward chain"]) and _agrees(HOSTILE["trailing junk"])
    assert _agrees(HOSTILE["OPT with extended rcode 0xff"]) and _agrees(HOSTILE["16 hops"])


def test_a_pointer_chain_over_16_hops_is_declined_as_dnspython_rejects_it() -> None:
    assert _agrees(HOSTILE["16 hops"])
    assert dnswire._fast_parse(b"\x00\x00" + HOSTILE["17 hops"][2:]) is None
    assert "PointerChainTooLong" in str(_reference(HOSTILE["17 hops"]))


def test_every_cut_of_every_message_is_declined_or_agrees() -> None:
    for wire in list(COMMON.values()) + list(HOSTILE.values()):
        for cut in range(len(wire)):
            _agrees(wire[:cut])


def test_random_mutations_agree_or_decline() -> None:
    rng = random.Random(17)
    corpus = list(COMMON.values()) + list(HOSTILE.values())
    accepted = 0
    for _ in range(20000):
        wire = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(wire))
            wire[i] = rng.choice((0, 1, 0x3F, 0x40, 0xC0, 0xFF, rng.getrandbits(8), wire[i] ^ (1 << rng.randrange(8))))
        accepted += _agrees(bytes(wire))
    assert accepted > 1000  # the mutations keep many messages in the fast path's shape


def test_the_fuzz_corpus_is_declined() -> None:
    rng = random.Random("fast")
    for wire in dnsfuzz.malformed(rng, 2000):
        if len(wire) >= 12:
            assert dnswire._fast_parse(b"\x00\x00" + wire[2:]) is None


def test_the_common_shape_never_calls_dnspython() -> None:
    # Not a speed test (nothing is timed): the fast path reads the bench's response shape,
    # so dnspython is not called for it at all.
    wire = COMMON["A answer"]
    calls = 0
    real = dns.message.from_wire

    def counting(*a: object, **k: object) -> dns.message.Message:
        nonlocal calls
        calls += 1
        return real(*a, **k)  # type: ignore[arg-type]  # passes dnspython's own arguments through

    dnswire._parse_cached.cache_clear()
    dns.message.from_wire = counting  # type: ignore[assignment]  # counting wrapper, restored below
    try:
        dnswire.parse_message(wire, True)
        dnswire.parse_message(HOSTILE["MX answer (left to dnspython)"], True)
    finally:
        dns.message.from_wire = real  # type: ignore[assignment]  # restoring the original
    assert calls == 1
