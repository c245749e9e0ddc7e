"""DNS messages from captured packet payloads: what a DNS flow record needs, nothing more.

Pure functions over bytes (no I/O), so they are tested with crafted wire data.

One pass over the message, checking it as ``dns.message.from_wire`` would and building only
what a flow shows. A whole ``dns.message.Message`` costs three to five times as much (every
record becomes a hashed rdata in an rdataset) for objects that are thrown away, and this
runs for every DNS packet on the node. Names are validated here and turned into text by
dnspython (``dns.name``), cached, because the same names are asked for again and again.
Addresses are formatted by ``dns.ipv4``/``dns.ipv6``, as dnspython prints them.

What is checked:

- a complete capture must be a whole message: every count in the header is met, every name
  is well formed (label types and lengths, total length, compression pointers that point
  strictly backwards, which rules out loops, exactly as dnspython's name parser), every
  record fits in the message, A/AAAA data are 4/16 bytes and CNAME data exactly one name.
  Bytes after the last record are ignored, as resolvers do. Other record data are skipped
  by their length.
- a capture shorter than the message (the kernel copies a bounded prefix; a TCP message can
  continue in later segments) is read as far as it goes: the header and the first
  question are required, answers are taken while they are whole.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

import dns.ipv4
import dns.ipv6
import dns.name
import dns.rdatatype

DNS_HEADER_LEN = 12
_HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
_RR_FIXED = struct.Struct("!HHIH")
_QR = 0x8000
_A = int(dns.rdatatype.A)
_AAAA = int(dns.rdatatype.AAAA)
_CNAME = int(dns.rdatatype.CNAME)
_OPT = int(dns.rdatatype.OPT)
_IN = 1
_MAX_NAME = 255


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
def _type_text(rdtype: int) -> str:
    return dns.rdatatype.to_text(rdtype)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=8192)
def _name_text(flat: bytes) -> str:
    # flat: the name's labels, uncompressed and already validated, with the root label.
    return dns.name.from_wire(flat, 0)[0].to_text().lower()


def _walk_name(wire: bytes, pos: int, labels: list[bytes] | None) -> int:
    """Validate the (possibly compressed) name at ``pos`` and return the offset after it;
    with ``labels``, also collect its labels (length byte included)."""
    end = len(wire)
    after = -1  # where the message continues once a pointer has been followed
    limit = pos  # a pointer must point before the name and before every earlier target
    length = 1  # the root label
    while True:
        if pos >= end:
            raise MalformedMessage("name runs past the end")
        count = wire[pos]
        if count == 0:
            return pos + 1 if after < 0 else after
        if count < 64:
            length += count + 1
            if length > _MAX_NAME:
                raise MalformedMessage("name longer than 255 octets")
            if pos + 1 + count > end:
                raise MalformedMessage("label runs past the end")
            if labels is not None:
                labels.append(wire[pos : pos + 1 + count])
            pos += count + 1
        elif count >= 192:
            if pos + 1 >= end:
                raise MalformedMessage("compression pointer runs past the end")
            target = ((count & 0x3F) << 8) | wire[pos + 1]
            if target >= limit:
                raise MalformedMessage("compression pointer does not point backwards")
            if after < 0:
                after = pos + 2
            limit = pos = target
        else:
            raise MalformedMessage(f"label type {count:#04x} is not defined")


def _read_name(wire: bytes, pos: int) -> tuple[str, int]:
    labels: list[bytes] = []
    end = _walk_name(wire, pos, labels)
    labels.append(b"\x00")
    try:
        return _name_text(b"".join(labels)), end
    except Exception as exc:  # dnspython on hostile bytes: this packet's error, not the reader's end
        raise MalformedMessage(f"name: {type(exc).__name__}: {exc}") from None


def parse_message(wire: bytes, complete: bool) -> DnsMessage:
    """One DNS message. ``complete`` says whether ``wire`` holds all of it.

    Raises :class:`MalformedMessage` when the header or the first question is unreadable,
    or, for a complete message, when any part of it is malformed.
    """
    n = len(wire)
    if n < DNS_HEADER_LEN:
        raise MalformedMessage(f"{n} bytes: shorter than a DNS header")
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    out = DnsMessage(id=ident, is_response=bool(flags & _QR), rcode=flags & 0xF, partial=not complete)
    pos = DNS_HEADER_LEN
    try:
        for i in range(qdcount):
            if i == 0:
                out.query, pos = _read_name(wire, pos)
            else:
                pos = _walk_name(wire, pos, None)
            if pos + 4 > n:
                raise MalformedMessage("question runs past the end")
            out.qtypes.append(_type_text(_U16.unpack_from(wire, pos)[0]))
            pos += 4
    except MalformedMessage:
        if complete or not out.qtypes:
            raise
        return out
    try:
        _read_records(wire, pos, out, ancount, ancount + nscount, ancount + nscount + arcount)
    except MalformedMessage:
        if complete:
            raise
    return out


def _read_records(wire: bytes, pos: int, out: DnsMessage, answers_end: int, authority_end: int,
                  total: int) -> None:
    """Answer, authority and additional records; answers fill ``out`` as they are read, so
    a capture that ends inside a record keeps the ones before it."""
    n = len(wire)
    for i in range(total):
        pos = _walk_name(wire, pos, None)
        if pos + 10 > n:
            raise MalformedMessage("record header runs past the end")
        rdtype, rdclass, ttl, rdlen = _RR_FIXED.unpack_from(wire, pos)
        rdata, pos = pos + 10, pos + 10 + rdlen
        if pos > n:
            raise MalformedMessage("record data run past the end")
        if i >= answers_end:
            if rdtype == _OPT and i >= authority_end:
                out.rcode |= (ttl >> 24) << 4  # EDNS: the upper 8 bits of a 12-bit rcode
            continue
        if (rdtype == _A or rdtype == _AAAA) and rdclass == _IN:  # other classes' A is not an address
            if rdlen != (4 if rdtype == _A else 16):
                raise MalformedMessage(f"{_type_text(rdtype)} record of {rdlen} bytes")
            raw = wire[rdata:pos]
            out.ips.append(dns.ipv4.inet_ntoa(raw) if rdlen == 4 else dns.ipv6.inet_ntoa(raw))
        elif rdtype == _CNAME:
            target, name_end = _read_name(wire[:pos], rdata)
            if name_end != pos:
                raise MalformedMessage("CNAME data is not exactly one name")
            out.cnames.append(target)
        if ttl > 0x7FFFFFFF:
            ttl = 0  # RFC 2181 section 8, as dnspython reads it
        out.rrtypes.append(_type_text(rdtype))
        out.ttl = ttl if i == 0 else min(out.ttl, ttl)


@dataclass(slots=True)
class TcpSplit:
    """The DNS messages framed in one TCP segment (see :func:`split_tcp`)."""

    messages: list[tuple[bytes, bool]]  # (bytes captured, whole message captured)
    continues_at: int | None = None  # payload offset where the next message starts, if past this segment
    error: str = ""  # why framing stopped at a malformed prefix ("" if it did not)


def split_tcp(payload: bytes, orig_len: int, start: int = 0) -> TcpSplit:
    """Messages of a TCP segment payload (RFC 7766 framing: a 2-byte length before each).

    ``payload`` is the captured prefix of a segment of ``orig_len`` bytes, and ``start`` the
    offset of the first message in it. When the last message runs past the segment,
    ``continues_at`` is the offset (greater than ``orig_len``) where the next one starts.
    Framing stops with ``error`` at a length too short for a DNS message, or at a segment
    that ends one byte into a length prefix.
    """
    out = TcpSplit([])
    pos = start
    while pos < orig_len:
        if pos + 2 > orig_len:
            out.error = "segment ends inside a TCP length prefix"
            return out
        if pos + 2 > len(payload):
            return out  # the rest of the segment was not captured: nothing more to frame
        length = (payload[pos] << 8) | payload[pos + 1]
        if length < DNS_HEADER_LEN:
            out.error = f"TCP length prefix {length}: shorter than a DNS header"
            return out
        body_end = pos + 2 + length
        out.messages.append((payload[pos + 2 : body_end], body_end <= len(payload)))
        if body_end > orig_len:
            out.continues_at = body_end
            return out
        pos = body_end
    return out
