"""Kernel code addresses to function names, read from ``/proc/kallsyms`` when asked.

bcc's ``BPF.ksym`` loads every kernel symbol into a cache inside libbcc on first use and keeps
it for the process's life: about 13 MB resident here (120k symbols), for the few distinct
drop locations (``skb:kfree_skb``'s ``location``) an agent ever names. This reads the file
once per lookup instead and keeps nothing: ~60 ms per distinct address, which the caller's
cache makes once per call site over the agent's life.

Lines are ``<16 hex digits> <type> <name>[\\t[module]]``, addresses zero-padded, so comparing
the hex text compares the addresses. A name is the nearest code symbol at or below the
address (what bcc answers); addresses hidden by ``kernel.kptr_restrict`` (all zero) name
nothing.
"""
from __future__ import annotations

import bisect

KALLSYMS = "/proc/kallsyms"
_CODE_TYPES = frozenset(b"tTwW")


def symbol(address: int, path: str = KALLSYMS) -> str:
    """The kernel function containing ``address``, or "" when it is unknown."""
    if address <= 0:
        return ""
    target = b"%016x" % address
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    # Sorting the lines sorts the symbols by address (modules come after the core kernel in
    # the file, so it is not sorted as read); both run in C, a Python loop over 120k lines
    # would take three times as long.
    lines = sorted(data.split(b"\n"))
    i = bisect.bisect_right(lines, target + b"\xff")
    while i > 0:
        i -= 1
        line = lines[i]
        if len(line) > 19 and line[17] in _CODE_TYPES:
            if line[:16].strip(b"0") == b"":  # kptr_restrict: every address reads as zero
                return ""
            return line[19:].split(b"\t", 1)[0].decode(errors="replace")
    return ""
