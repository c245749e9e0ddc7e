"""Counting sockets by state: from ``/proc/net/{tcp,tcp6,udp,udp6}`` text, and from the
messages of a ``NETLINK_SOCK_DIAG`` dump (see sockdiag.py for why and how it is requested).

Every data line of these tables starts ``sl: local rem st``, with addresses in hex
(8 digits for IPv4, 32 for IPv6) and the state as two hex digits. A node can hold tens of
thousands of sockets, so one regular expression finds every well-formed line and its state
in one pass (as fast as splitting each line, measured, and it validates the line too).
"""
from __future__ import annotations

import os
import re
import struct
from collections import Counter

# include/net/tcp_states.h. Names as Retina (cakturk/go-netstat) and `ss` print them,
# except TCP_CLOSE, which Retina prints as an empty string and flowtel calls CLOSE.
TCP_STATES: dict[int, str] = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}

# Anchored on the newline before each data line rather than on "^" with re.MULTILINE, which
# tries a match at every character and is twice as slow; the header supplies the first "\n".
_STATE_FIELD = re.compile(r"\n *\d+: [0-9A-Fa-f]+:[0-9A-Fa-f]{4} [0-9A-Fa-f]+:[0-9A-Fa-f]{4} ([0-9A-Fa-f]{2}) ")


def socket_states(text: str) -> tuple[Counter[int], int]:
    """Sockets per state code in one socket table, and the number of malformed lines.

    The first line is the table's header.
    """
    by_hex = Counter(_STATE_FIELD.findall(text))
    states: Counter[int] = Counter()
    for code, n in by_hex.items():
        states[int(code, 16)] += n
    # Lines that are not the header and did not match are malformed (blank ones included:
    # the kernel never prints them).
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return states, max(0, lines - 1 - sum(states.values()))


# -- NETLINK_SOCK_DIAG dump messages ---------------------------------------------------------

NLMSG_ERROR = 2
NLMSG_DONE = 3
_NLMSG_HEADER = struct.Struct("=IH")  # nlmsg_len, nlmsg_type (flags, seq, pid follow)
_NLMSG_HEADER_SIZE = 16
_INT = struct.Struct("=i")
# struct inet_diag_msg starts with idiag_family, idiag_state.
_STATE_OFFSET = _NLMSG_HEADER_SIZE + 1


def diag_states(data: bytes | bytearray | memoryview, states: Counter[int]) -> tuple[bool, int]:
    """Add the TCP state of every ``inet_diag_msg`` in one netlink read to ``states``.

    Returns whether the dump's ``NLMSG_DONE`` was in this read, and the number of malformed
    messages (a message that overruns the read stops its parsing). Raises OSError when the
    kernel ends the dump with an error.
    """
    errors = 0
    done = False
    # One slot per possible state byte: cheaper per socket than a Counter update.
    counts = [0] * 256
    unpack = _NLMSG_HEADER.unpack_from
    off, end = 0, len(data)
    while off + _NLMSG_HEADER_SIZE <= end:
        length, kind = unpack(data, off)
        if length < _NLMSG_HEADER_SIZE or off + length > end:
            errors += 1
            break
        if kind == NLMSG_DONE or kind == NLMSG_ERROR:
            # Both carry an int: 0 at the end of a dump (or an ACK), -errno on failure.
            code = _INT.unpack_from(data, off + _NLMSG_HEADER_SIZE)[0] if length >= 20 else 0
            if code < 0:
                raise OSError(-code, os.strerror(-code))
            done = True
            break
        if length <= _STATE_OFFSET:
            errors += 1
        else:
            counts[data[off + _STATE_OFFSET]] += 1
        off += (length + 3) & ~3  # NLMSG_ALIGN
    else:
        if off < end:
            errors += 1
    for state, n in enumerate(counts):
        if n:
            states[state] += n
    return done, errors
