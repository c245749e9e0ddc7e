"""Counting sockets by state from ``/proc/net/{tcp,tcp6,udp,udp6}`` text (the netlink way,
for ``tcp_state``, is sockdiag.py).

Every data line of these tables starts ``sl: local rem st``, with addresses in hex
(8 digits for IPv4, 32 for IPv6) and the state as two hex digits. A node can hold tens of
thousands of sockets, so one regular expression finds every well-formed line and its state
in one pass (as fast as splitting each line, measured, and it validates the line too).
"""
from __future__ import annotations

import re
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
