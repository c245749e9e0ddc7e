"""DNS messages from captured packet payloads: what a DNS flow record needs, nothing more.

Pure functions over bytes (no I/O), so they are tested with crafted wire data.

DNS wire format is parsed by dnspython (``dns.message.from_wire``), the project's library
for it: it checks every count, name (label types and lengths, total length, compression
pointers, which must point backwards, so no loop), record bounds and record data (each
type's own format, not only A/AAAA/CNAME), OPT and TSIG placement. Records are read one
per rrset (``one_rr_per_rrset``), so answers keep their wire order and repeats; TSIG
signatures are not validated (``keyring=False``: a signed message is read like any other);
bytes after the last record are ignored (``ignore_trailing``), as resolvers do. This module
only picks out the fields a flow shows.

dnspython's price is CPU: a whole ``Message`` is built per message. Measured per message
over the unit tests' corpus (CPython 3.11, dnspython 2.9): a query or an empty answer
25–60 µs, a response of two to four records 110–210 µs, a malformed packet ~20 µs, a
59-record answer ~1.9 ms; ~30 µs more per record. So the shapes nearly every message on a
node has (opcode QUERY, one question, A/AAAA/CNAME answers, SOA/NS authority, glue, an
empty OPT; every class IN; names of plain labels) are read first by a one-pass reader here
(:func:`_fast_parse`, 4–10 µs for a query or a response of one to three records, 15–40×
less than dnspython on the same messages), which applies dnspython's own rules to what it
reads (label types and lengths, its compression-pointer rule, name lengths, record bounds,
each type's data length, OPT placement) and **declines** (returns None) anything else, or
anything unusual in one of those shapes: dnspython then reads it, and its verdict on a
malformed message is still the only one. The fast path therefore never accepts what
dnspython rejects and never reports other fields than it would:
``test_dns_wire_fast.py`` checks exactly that over real messages, hostile ones (pointer
loops, pointers forward or into the rdata, 17-hop chains, names of 256 bytes, misplaced or
optioned OPT, bad record lengths), every cut of each, and 20 000 random mutations. Either
way the cost is paid once per distinct message without its ID (the cache below), on the
DNS ring buffer's reader thread, for samples only (the kernel counts every message,
bpf/dns.h).

A capture shorter than the message (the kernel copies a bounded prefix) is read with ``continue_on_error``: dnspython keeps what it read
before the capture ran out. The header and the first question are required; the answers
are the records read whole (one whose data are malformed is skipped, as
``continue_on_error`` does).
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

import dns.flags
import dns.ipv4
import dns.ipv6
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype

DNS_HEADER_LEN = 12
_QR = int(dns.flags.QR)
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_CNAME = dns.rdatatype.CNAME
_IN = dns.rdataclass.IN
# Labels dnspython prints as they are (it escapes ``"().;\\@$``, spaces and non-printables).
# Checked with bytes.translate (delete these; anything left is not plain): one linear pass in
# C over pod-controlled bytes, no regex engine.
_PLAIN_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789_-"
_PLAIN_BYTES_AND_DOT = _PLAIN_BYTES + b"."


def _plain(text: bytes, allowed: bytes) -> bool:
    return bool(text) and not text.translate(None, allowed)


class MalformedMessage(Exception):
    """The payload is not a DNS message whose header and first question can be read."""


@dataclass(slots=True)
class DnsMessage:
    """The parts of one DNS message that a Hubble ``l7.dns`` record shows."""

    id: int
    is_response: bool
    rcode: int  # with the EDNS extended bits when the OPT record was read
    # As Cilium's DNS parsing reports them: names absolute and in lower case ("example.com."),
    # the first question's name, the type of every question, and of every answer record.
    query: str = ""
    qtypes: list[str] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)  # A/AAAA answers, in wire order
    cnames: list[str] = field(default_factory=list)  # CNAME targets in the answer section
    rrtypes: list[str] = field(default_factory=list)
    ttl: int = 0  # smallest TTL of the answers; 0 with no answers
    partial: bool = False  # read from an incomplete capture: records may be missing


@functools.lru_cache(maxsize=1024)
def type_text(rdtype: int) -> str:
    """A record type's mnemonic (``A``, ``AAAA``, ``TYPE65280`` for unknown ones)."""
    return dns.rdatatype.to_text(rdtype)  # type: ignore[arg-type]  # to_text takes any int (unknown types print as TYPEnnn)


@functools.lru_cache(maxsize=8192)
def _name_text(name: dns.name.Name) -> str:
    # dns.name.Name compares and hashes without regard to case, so one entry serves every
    # spelling of a name: the text is lower case anyway.
    return name.to_text().lower()


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def parse_message(wire: bytes, complete: bool) -> DnsMessage:
    """One DNS message. ``complete`` says whether ``wire`` holds all of it.

    Raises :class:`MalformedMessage` when the header or the first question is unreadable,
    or, for a complete message, when dnspython finds any part of it malformed.
    """
    n = len(wire)
    if n < DNS_HEADER_LEN:
        raise MalformedMessage(f"{n} bytes: shorter than a DNS header")
    # The cache keys on the message without its ID: a resolver's stream of queries for one
    # name, their answers, and one message seen at two veths differ only there, so dnspython
    # (tens of µs) runs once per distinct message and the result is copied with this ID.
    m = _parse_cached(wire[2:], complete)
    return DnsMessage((wire[0] << 8) | wire[1], m.is_response, m.rcode, m.query, list(m.qtypes), list(m.ips),
                      list(m.cnames), list(m.rrtypes), m.ttl, m.partial)


def parse_shared(wire: bytes, complete: bool) -> DnsMessage:
    """:func:`parse_message` without the copy: the cached parse of the message without its
    ID, shared by every message that differs from it only there. Its ``id`` is 0 and it must
    not be changed (a caller that needs the ID reads the first two bytes)."""
    if len(wire) < DNS_HEADER_LEN:
        raise MalformedMessage(f"{len(wire)} bytes: shorter than a DNS header")
    return _parse_cached(wire[2:], complete)


def question_name(wire: bytes) -> str:
    """The first question's name (lower case, absolute), read alone: for a message whose
    header and question the kernel has already checked (bpf/dns.h), when nothing else of it
    is wanted. A name of letters, digits, ``-`` and ``_`` only (what resolvers ask for) is
    joined here, ~1 µs; any other is read by dnspython's name reader so that its escapes
    (``\\DDD``, ``\\.``) are dnspython's. Either way no message is built (25–60 µs for a
    query). Raises :class:`MalformedMessage` if the name cannot be read."""
    labels: list[bytes] = []
    pos = DNS_HEADER_LEN
    n = len(wire)
    while pos < n:
        length = wire[pos]
        if length == 0:
            if not labels:
                return "."
            # The wire length (labels + their length bytes + the root) within DNS's 255, as
            # dnspython checks it; a longer name falls through to dnspython, which refuses it.
            if pos + 1 - DNS_HEADER_LEN <= 255 and _plain(b"".join(labels).lower(), _PLAIN_BYTES):
                return (b".".join(labels).lower() + b".").decode("ascii")
            break
        if length > 63 or pos + 1 + length > n:
            break  # a pointer, a reserved type or a cut label: dnspython says what is wrong
        labels.append(wire[pos + 1 : pos + 1 + length])
        pos += 1 + length
    try:
        name, _ = dns.name.from_wire(wire, DNS_HEADER_LEN)
    except Exception as exc:  # dnspython on hostile bytes raises more than FormError
        raise MalformedMessage(_why(exc)) from None
    return _name_text(name)


@functools.lru_cache(maxsize=4096)
def _parse_cached(wire_after_id: bytes, complete: bool) -> DnsMessage:
    # Any ID parses the same; 0 stands in (the caller puts the real one back).
    wire = b"\x00\x00" + wire_after_id
    if complete:
        fast = _fast_parse(wire)
        if fast is not None:
            return fast
    return _dnspython_parse(wire, complete)


def _dnspython_parse(wire: bytes, complete: bool) -> DnsMessage:
    """The reference reading of any message, whole or a capture's prefix."""
    try:
        m = dns.message.from_wire(wire, keyring=False, one_rr_per_rrset=True, ignore_trailing=True,
                                  continue_on_error=not complete)
    except Exception as exc:  # dnspython on hostile bytes raises more than FormError
        raise MalformedMessage(_why(exc)) from None
    if not complete and m.errors and not m.question and (wire[4] or wire[5]):
        # The capture ended (or the bytes went bad) before the first question was whole.
        raise MalformedMessage(_why(m.errors[0].exception))
    out = DnsMessage(id=m.id, is_response=bool(m.flags & _QR), rcode=int(m.rcode()), partial=not complete)
    if m.question:
        out.query = _name_text(m.question[0].name)
        out.qtypes = [type_text(q.rdtype) for q in m.question]
    for i, rrset in enumerate(m.answer):  # one record per rrset
        rdtype = rrset.rdtype
        if rdtype in _ADDRESS_TYPES:
            if rrset.rdclass == _IN:  # other classes' A is not an address
                out.ips.extend(rd.address for rd in rrset)
        elif rdtype == _CNAME:
            out.cnames.extend(_name_text(rd.target) for rd in rrset)
        out.rrtypes.append(type_text(rdtype))
        out.ttl = rrset.ttl if i == 0 else min(out.ttl, rrset.ttl)
    return out


# -- the fast path ------------------------------------------------------------------------
#
# What nearly every response on a node is: opcode QUERY, one question, answers of A, AAAA and
# CNAME, an authority of SOA or NS, at most an empty OPT (EDNS without options) in the
# additional section, every class IN. _fast_parse reads that shape in one pass, ~10 µs for
# a response of a few records where dnspython takes 100–200 µs, and checks everything
# dnspython would check of it (counts, label lengths and types, compression pointers by
# dnspython's own rule, name lengths, each record's bounds and data, OPT placement). Any
# other message, and anything unusual in this one (a name that needs escapes, another record
# type or class, a short capture, any error), gives None and dnspython reads it: the fast
# path only ever agrees with dnspython or declines (test_dns_wire.py checks both over real,
# crafted and mutated messages), so malformed input is still judged, and counted, by it.

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_QUESTION = struct.Struct("!HH")
_TYPE_A, _TYPE_NS, _TYPE_CNAME, _TYPE_SOA, _TYPE_AAAA, _TYPE_OPT = 1, 2, 5, 6, 28, 41
_CLASS_IN = 1
_MAX_POINTER_HOPS = 16  # dnspython's MAX_COMPRESSION_POINTER_CHAIN
_MAX_NAME_WIRE = 255
_SOA_FIELDS = 20  # serial, refresh, retry, expire, minimum


def _fast_name(wire: bytes, pos: int, end: int, text: bool) -> tuple[str, int] | None:
    """A name at ``pos`` (``end``: where the parser's view ends, a record's rdata end inside
    one) as dnspython's ``from_wire_parser`` reads it: labels of up to 63 bytes, compression
    pointers that point strictly before the name's start and before every earlier pointer
    (so no loop: each hop goes backwards), at most 16 hops, a pointer's target ending before
    the part it was reached from, ≤ 255 bytes in all. Returns its text (lower case, "" when
    ``text`` is false) and the offset after it; None for anything else, or a name whose text
    would need escapes. (With ``text`` false, the text is "." for the root name, else "".)"""
    labels: list[bytes] = []
    biggest = start = pos
    after = -1
    hops = 0
    total = 1  # the root label
    while True:
        if pos >= end:
            return None
        count = wire[pos]
        pos += 1
        if count == 0:
            break
        if count < 64:
            if pos + count > end:
                return None
            total += count + 1
            if total > _MAX_NAME_WIRE:
                return None
            if text:
                labels.append(wire[pos : pos + count])
            pos += count
        elif count >= 192:
            if pos >= end:
                return None
            target = ((count & 0x3F) << 8) | wire[pos]
            pos += 1
            if target >= biggest:
                return None
            hops += 1
            if hops > _MAX_POINTER_HOPS:
                return None
            if after < 0:
                after = pos
            biggest = target
            end = start  # the target must end before the part that pointed at it
            pos = start = target
        else:
            return None  # reserved label types 0x40 and 0x80
    if after < 0:
        after = pos
    if not text:
        return ("." if total == 1 else ""), after
    if not labels:
        return ".", after
    joined = b".".join(labels).lower()
    # Plain labels, and no "." inside one (it would print escaped): one dot per label boundary.
    if not _plain(joined, _PLAIN_BYTES_AND_DOT) or joined.count(b".") != len(labels) - 1:
        return None
    return joined.decode("ascii") + ".", after


def _fast_parse(wire: bytes) -> DnsMessage | None:
    """``wire`` (a whole message, ID 0) read without dnspython, or None: see above."""
    n = len(wire)
    if n < DNS_HEADER_LEN:
        return None
    _, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    if flags & 0x7800 or qdcount != 1:  # opcode QUERY only; one question
        return None
    q = _fast_name(wire, DNS_HEADER_LEN, n, True)
    if q is None:
        return None
    query, pos = q
    if pos + 4 > n:
        return None
    qtype, _ = _QUESTION.unpack_from(wire, pos)  # any class and type: dnspython checks none
    pos += 4
    out = DnsMessage(id=0, is_response=bool(flags & 0x8000), rcode=flags & 0xF, query=query, qtypes=[type_text(qtype)])
    ips, cnames, rrtypes = out.ips, out.cnames, out.rrtypes
    opt_seen = False
    for section, count in ((1, ancount), (2, nscount), (3, arcount)):
        for _ in range(count):
            owner = _fast_name(wire, pos, n, False)
            if owner is None:
                return None
            pos = owner[1]
            if pos + 10 > n:
                return None
            rdtype, rdclass, ttl, rdlen = _RR.unpack_from(wire, pos)
            pos += 10
            rd_end = pos + rdlen
            if rd_end > n:
                return None
            if rdtype == _TYPE_OPT:
                # EDNS: once, in the additional section, owned by the root, with no options
                # (options are each parsed by their own code in dnspython: it reads those).
                if section != 3 or opt_seen or rdlen or owner[0] != ".":
                    return None
                opt_seen = True
                out.rcode |= (ttl >> 20) & 0xFF0
                continue
            if rdclass != _CLASS_IN:
                return None
            if rdtype == _TYPE_A or rdtype == _TYPE_AAAA:
                if rdlen != (4 if rdtype == _TYPE_A else 16):
                    return None
                if section == 1:
                    ips.append(dns.ipv4.inet_ntoa(wire[pos:rd_end]) if rdtype == _TYPE_A
                               else dns.ipv6.inet_ntoa(wire[pos:rd_end]))
            elif rdtype == _TYPE_CNAME or rdtype == _TYPE_NS:
                target = _fast_name(wire, pos, rd_end, section == 1 and rdtype == _TYPE_CNAME)
                if target is None or target[1] != rd_end:
                    return None
                if section == 1 and rdtype == _TYPE_CNAME:
                    cnames.append(target[0])
            elif rdtype == _TYPE_SOA:
                mname = _fast_name(wire, pos, rd_end, False)
                rname = None if mname is None else _fast_name(wire, mname[1], rd_end, False)
                if rname is None or rname[1] + _SOA_FIELDS != rd_end:
                    return None
            else:
                return None
            if section == 1:
                if ttl > 0x7FFFFFFF:
                    ttl = 0  # as dnspython reads it (RFC 2181: treat as zero)
                out.ttl = ttl if not rrtypes else min(out.ttl, ttl)
                rrtypes.append(type_text(rdtype))
            pos = rd_end
    return out
