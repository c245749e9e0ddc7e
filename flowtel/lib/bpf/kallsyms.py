"""Kernel code addresses to function names, from ``/proc/kallsyms``, in a compact index.

bcc's ``BPF.ksym`` loads every kernel symbol into a cache inside libbcc on first use and keeps
it for the process's life: about 13 MB resident here (120k symbols), for the few distinct
drop locations (``skb:kfree_skb``'s ``location``) an agent ever names. This keeps the same
symbols as three flat arrays instead (addresses, name offsets, one bytes blob of names:
≈ 4 MB), built on the first lookup. Reading the file is most of the cost (the kernel formats
120k lines: ≈ 90 ms here), so it is read once, and again only when the loaded modules change
(a module loaded later has symbols the index lacks; ``/proc/modules`` says so cheaply).

Lines are ``<16 hex digits> <type> <name>[\\t[module]]``, addresses zero-padded, so sorting
the lines sorts the addresses. A name is the nearest code symbol at or below the address
(what bcc answers); addresses hidden by ``kernel.kptr_restrict`` (all zero) name nothing.
"""
from __future__ import annotations

import bisect
import itertools
import re
import sys
import threading
from array import array

KALLSYMS = "/proc/kallsyms"
MODULES = "/proc/modules"
# address, name of a code symbol (t/T, weak w/W); a module's name follows a tab.
_CODE_LINE = re.compile(rb"^([0-9a-f]{16}) [tTwW] ([^\t\n]+)", re.M)


class _Index:
    __slots__ = ("addresses", "ends", "names", "modules")

    def __init__(self, data: bytes, modules: bytes) -> None:
        # Sorting the lines sorts them by address (modules come after the core kernel in the
        # file, so it is not sorted as read). Every step below runs in C: a Python loop over
        # 120k lines would double the build.
        found = _CODE_LINE.findall(b"\n".join(sorted(data.split(b"\n"))))
        found = [f for f in found if f[0] != b"0000000000000000"]  # kptr_restrict hides them all
        self.addresses = array("Q", bytes.fromhex(b"".join(f[0] for f in found).decode()))
        if sys.byteorder == "little":
            self.addresses.byteswap()  # the hex text is big-endian
        names = [f[1] for f in found]
        self.ends = array("I", itertools.accumulate(map(len, names)))  # end of each name in `names`
        self.names = b"".join(names)
        self.modules = modules

    def lookup(self, address: int) -> str:
        i = bisect.bisect_right(self.addresses, address) - 1
        if i < 0:
            return ""
        start = self.ends[i - 1] if i else 0
        return self.names[start:self.ends[i]].decode(errors="replace")


class KernelSymbols:
    """Address → name over one kallsyms file (one per process: :func:`symbol`)."""

    def __init__(self, kallsyms: str = KALLSYMS, modules: str = MODULES) -> None:
        self._kallsyms = kallsyms
        self._modules = modules
        self._index: _Index | None = None
        self._lock = threading.Lock()

    def _read(self, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def symbol(self, address: int) -> str:
        """The kernel function containing ``address``, or "" when it is unknown."""
        if address <= 0:
            return ""
        with self._lock:
            modules = self._read(self._modules)
            if self._index is None or self._index.modules != modules:
                self._index = _Index(self._read(self._kallsyms), modules)
            return self._index.lookup(address)


_default = KernelSymbols()


def symbol(address: int) -> str:
    """The kernel function containing ``address`` (``/proc/kallsyms``), or ""."""
    return _default.symbol(address)
