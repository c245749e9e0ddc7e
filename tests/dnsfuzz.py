"""Malformed DNS messages for fuzzing, each malformed by construction (not by chance).

Every kind is malformed per RFC 1035 and rejected by ``dns.message.from_wire`` too (the unit
tests check both), so none of them is a parser's opinion.

Shared by the unit tests (which check that every one is counted as a parse error) and the
end-to-end fuzz test (which sends them over the wire). Every message is shorter than the
default capture (512 bytes), so the kernel hands user space all of it.
"""
from __future__ import annotations

import random
import struct

import dns.message

MAX_LEN = 500
_HEADER = struct.Struct("!HHHHHH")


def _header(rng: random.Random, qd: int, an: int = 0, ns: int = 0, ar: int = 0, flags: int | None = None) -> bytes:
    return _HEADER.pack(rng.getrandbits(16), rng.getrandbits(16) & 0x7FFF if flags is None else flags, qd, an, ns, ar)


def _question(name: bytes = b"\x03www\x07example\x03com\x00", qtype: int = 1) -> bytes:
    return name + struct.pack("!HH", qtype, 1)


def empty(rng: random.Random) -> bytes:
    return b""


def short_header(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(1, 11))


def missing_question(rng: random.Random) -> bytes:
    return _header(rng, qd=rng.randint(1, 20))


def cut_question(rng: random.Random) -> bytes:
    q = _question()
    return _header(rng, qd=1) + q[: rng.randint(1, len(q) - 1)]


def missing_answers(rng: random.Random) -> bytes:
    return _header(rng, qd=1, an=rng.randint(1, 50), flags=0x8180) + _question()


def pointer_loop(rng: random.Random) -> bytes:
    # The name at offset 12 points at itself; a two-pointer cycle is the other form.
    if rng.random() < 0.5:
        name = b"\xc0\x0c"
    else:
        name = b"\xc0\x0e\xc0\x0c"
    return _header(rng, qd=1) + name + b"\x00\x01\x00\x01"


def pointer_out_of_range(rng: random.Random) -> bytes:
    return _header(rng, qd=1) + bytes([0xC0 | rng.randint(1, 0x3F), rng.getrandbits(8)]) + b"\x00\x01\x00\x01"


def name_too_long(rng: random.Random) -> bytes:
    labels = b"".join(b"\x3f" + bytes([rng.randint(97, 122)]) * 63 for _ in range(rng.randint(5, 7)))
    return _header(rng, qd=1) + labels + b"\x00\x00\x01\x00\x01"


def bad_label_type(rng: random.Random) -> bytes:
    return _header(rng, qd=1) + bytes([rng.choice((0x40, 0x41, 0x80, 0xBF))]) + b"abc\x00\x00\x01\x00\x01"


def bad_rdata_length(rng: random.Random) -> bytes:
    # An A record whose rdata is not 4 bytes, or whose rdlength runs past the message.
    rdlen = rng.choice((0, 1, 3, 5, 200))
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, rdlen) + b"\x01\x02\x03\x04\x05"[: min(rdlen, 5)]
    return _header(rng, qd=1, an=1, flags=0x8180) + _question() + rr


def random_bytes(rng: random.Random) -> bytes:
    # 65535 questions cannot fit in MAX_LEN bytes, whatever the random bytes say.
    body = rng.randbytes(rng.randint(0, MAX_LEN - 12))
    return _header(rng, qd=0xFFFF, an=rng.getrandbits(16), ns=rng.getrandbits(16), ar=rng.getrandbits(16)) + body


GENERATORS = (
    empty, short_header, missing_question, cut_question, missing_answers, pointer_loop,
    pointer_out_of_range, name_too_long, bad_label_type, bad_rdata_length, random_bytes,
)


def malformed(rng: random.Random, count: int) -> list[bytes]:
    """``count`` malformed DNS messages, every generator used in turn."""
    out = []
    for i in range(count):
        msg = GENERATORS[i % len(GENERATORS)](rng)
        assert len(msg) <= MAX_LEN
        out.append(msg)
    return out


def tcp_malformed(rng: random.Random, count: int) -> list[bytes]:
    """TCP segment payloads (length prefix included) that hold no readable message."""
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            out.append(struct.pack("!H", rng.randint(0, 11)) + rng.randbytes(11))  # prefix too short for a header
        elif kind == 1:
            out.append(bytes([rng.getrandbits(8)]))  # one byte: not even a length prefix
        else:
            msg = GENERATORS[rng.randrange(1, len(GENERATORS))](rng)
            out.append(struct.pack("!H", len(msg)) + msg)
    return out


def valid_query(name: str, qtype: str = "A") -> dns.message.Message:
    return dns.message.make_query(name, qtype)
