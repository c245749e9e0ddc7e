"""Kernel code addresses to function names, from ``/proc/kallsyms``, in a compact index.

bcc's ``BPF.ksym`` loads every kernel symbol into a cache inside libbcc on first use and keeps
it for the process's life: about 13 MB resident here (120k symbols), for the few distinct
drop locations (``skb:kfree_skb``'s ``location``) an agent ever names. This keeps the same
symbols as three flat arrays instead (addresses, name offsets, one bytes blob of names:
≈ 5.5 MB resident, ≈ 18 MB for the moment it is built), at start (:func:`prime`) or on the
first lookup: ≈ 0.2 s, half of it the kernel formatting 120k lines. It is read once, and again only when the loaded
modules change (a module loaded later has symbols the index lacks; ``/proc/modules`` says so
cheaply).

Lines are ``<16 hex digits> <type> <name>[\\t[module]]``. A name is the nearest code symbol
at or below the address (what bcc answers); addresses hidden by ``kernel.kptr_restrict``
(all zero) name nothing.
"""
from __future__ import annotations

import bisect
import sys
import threading
from array import array
from typing import Iterable

KALLSYMS = "/proc/kallsyms"
MODULES = "/proc/modules"
_CODE_TYPES = frozenset(b"tTwW")  # code symbols (and weak ones, which are code here)


class _Index:
    __slots__ = ("addresses", "ends", "names", "modules")

    def __init__(self, lines: Iterable[bytes], modules: bytes) -> None:
        # Streamed line by line into flat buffers: the whole file as one bytes object, or as a
        # list of lines, would hold 10-50 MB for a moment for an index of 4.
        hexes = bytearray()
        blob = bytearray()
        ends = array("I")
        for line in lines:
            if len(line) > 19 and line[17] in _CODE_TYPES:
                hexes += line[:16]
                tab = line.find(b"\t", 19)  # a module's name follows a tab
                blob += line[19:tab] if tab > 0 else line[19:].rstrip(b"\n")
                ends.append(len(blob))
        addresses = array("Q", bytes.fromhex(hexes.decode()))
        del hexes
        if sys.byteorder == "little":
            addresses.byteswap()  # the hex text is big-endian
        self.modules = modules
        self.addresses = array("Q")
        self.ends = array("I")
        self.names = b""
        if not any(addresses):  # kptr_restrict: every address reads as zero; nothing to name
            return
        # Modules come after the core kernel in the file, so it is not sorted as read.
        order = sorted(range(len(addresses)), key=addresses.__getitem__)
        names = bytearray()
        for i in order:
            self.addresses.append(addresses[i])
            names += blob[ends[i - 1] if i else 0:ends[i]]
            self.ends.append(len(names))
        self.names = bytes(names)

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

    def _build(self, modules: bytes) -> _Index:
        try:
            with open(self._kallsyms, "rb") as f:
                return _Index(f, modules)
        except OSError:
            return _Index((), modules)

    def _current(self) -> _Index:
        modules = self._read(self._modules)
        if self._index is None or self._index.modules != modules:
            self._index = self._build(modules)
        return self._index

    def prime(self) -> None:
        """Build the index now (at start, where its one-time cost belongs) rather than at the
        first lookup."""
        with self._lock:
            self._current()

    def symbol(self, address: int) -> str:
        """The kernel function containing ``address``, or "" when it is unknown."""
        if address <= 0:
            return ""
        with self._lock:
            return self._current().lookup(address)


_default = KernelSymbols()


def symbol(address: int) -> str:
    """The kernel function containing ``address`` (``/proc/kallsyms``), or ""."""
    return _default.symbol(address)


def prime() -> None:
    """Build the process's index now (see :meth:`KernelSymbols.prime`)."""
    _default.prime()
