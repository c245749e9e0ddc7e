"""Parsers of the kernel's protocol counter files: ``/proc/net/snmp``, ``/proc/net/netstat``
and ``/proc/net/snmp6``. Pure functions over text; the receiver does the reading.

Both return counters grouped by *section*: ``Ip``, ``Tcp``, ``TcpExt``, … as the files name
them, and for ``snmp6`` the prefix each name carries (``Ip6``, ``Udp6``, ``Icmp6``). Names are
kept exactly as the kernel prints them, because that is what Retina reports as
``statistic_name`` and what ``nstat`` prints after the section (``TcpExt`` + ``TCPTimeouts``).
Each parser also returns how many lines or fields it could not use, so that a kernel that
changes a format shows up in the receiver's ``parse_errors`` instead of as silent zeros.
"""
from __future__ import annotations

Sections = dict[str, dict[str, int]]


def to_int(raw: str) -> int | None:
    """The value of a decimal field, or None when it is not one.

    ``int()`` alone would also take ``1_000``, `` 7 `` and non-ASCII digits, none of which a
    kernel prints; accepting them would hide a garbled file. ``-1`` is real (``Tcp: MaxConn``).
    """
    if raw.isascii():
        if raw.isdigit():
            return int(raw)
        if raw[:1] == "-" and raw[1:].isdigit():
            return int(raw)
    return None


def parse_paired(text: str) -> tuple[Sections, int]:
    """``/proc/net/snmp`` or ``/proc/net/netstat``: each section is a line of names after
    ``Section:`` followed by a line of values after the same ``Section:``.

    A pair whose lines disagree in length (a truncated read, a hand-edited file) still yields
    the fields both lines have and counts one error; a lone line counts one error and parsing
    resumes at the next line, so one bad section never hides the others.
    """
    sections: Sections = {}
    errors = 0
    lines = text.splitlines()
    i, n = 0, len(lines)
    while i < n:
        header = lines[i].split()
        if not header:
            i += 1
            continue
        prefix = header[0]
        values = lines[i + 1].split() if i + 1 < n else []
        # A line of numbers where names are expected is a value line that lost its header.
        orphan = len(header) > 1 and to_int(header[1]) is not None
        if orphan or len(prefix) < 2 or prefix[-1] != ":" or not values or values[0] != prefix:
            errors += 1
            i += 1
            continue
        if len(values) != len(header):
            errors += 1
        counters = sections.setdefault(prefix[:-1], {})
        for name, raw in zip(header[1:], values[1:]):
            value = to_int(raw)
            if value is None:
                errors += 1
            else:
                counters[name] = value
        i += 2
    return sections, errors


def parse_snmp6(text: str) -> tuple[Sections, int]:
    """``/proc/net/snmp6``: one ``Name value`` pair per line, the section in the name
    (``Ip6InDiscards`` is in ``Ip6``, ``UdpLite6InErrors`` in ``UdpLite6``).

    Names keep their prefix: ``Ip6InDiscards`` and ``Ip: InDiscards`` are different counters
    and both can be reported in one family.
    """
    sections: Sections = {}
    errors = 0
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            errors += 1
            continue
        name, raw = parts
        value = to_int(raw)
        if value is None:
            errors += 1
            continue
        head, six, _ = name.partition("6")
        sections.setdefault(head + six if six else "", {})[name] = value
    return sections, errors
