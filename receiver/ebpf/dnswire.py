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

The price is CPU: a whole ``Message`` is built for every DNS packet on the node. Measured
per message over the unit tests' corpus (CPython 3.11, dnspython 2.9): a query or an empty
answer 25–60 µs, a response of two to four records 110–210 µs, a malformed packet ~20 µs,
a 59-record answer ~1.9 ms (~1 ms for its 512-byte capture), against 1.4–6 µs (57 µs for 59 records) for the
hand-written single-pass reader this replaced; the cost grows by ~30 µs per record. It is
paid on the DNS ring buffer's reader thread, once per distinct sampled message (the kernel
counts every message; user space parses only samples, bpf/dns.h). That
buys one parser, maintained upstream, whose verdict on a malformed message is the
reference one, instead of a copy that has to be kept in step with it.

A capture shorter than the message (the kernel copies a bounded prefix) is read with ``continue_on_error``: dnspython keeps what it read
before the capture ran out. The header and the first question are required; the answers
are the records read whole (one whose data are malformed is skipped, as
``continue_on_error`` does).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import dns.flags
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
_PLAIN_LABELS = re.compile(rb"[a-z0-9_-]+")


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
            if pos + 1 - DNS_HEADER_LEN <= 255 and _PLAIN_LABELS.fullmatch(b"".join(labels).lower()):
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
