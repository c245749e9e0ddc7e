"""A BPF ring buffer read by one thread, with its own libbpf ring manager.

bcc keeps one manager per loaded module and ``ring_buffer_poll`` polls every ring opened on
it; with several programs in one module (one LLVM per agent), two readers on two threads
would then poll each other's rings concurrently, which libbpf does not allow. Each
:class:`RingReader` owns its manager, so each ring has exactly one polling thread.
"""
from __future__ import annotations

import ctypes
from typing import Any, Callable


class RingReader:
    """Calls ``on_record(bytes)`` for each record of the ring buffer map ``map_fd``, from
    :meth:`poll` / :meth:`consume` only (the caller's thread)."""

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None]) -> None:
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib  # the system's python3-bpfcc

        self._lib = lib

        def callback(_ctx: Any, data: int, size: int) -> int:
            on_record(ctypes.string_at(data, size))
            return 0

        self._cb = _RINGBUF_CB_TYPE(callback)  # kept: libbpf holds the pointer
        self._rb = lib.bpf_new_ringbuf(map_fd, self._cb, None)
        if not self._rb:
            raise OSError(ctypes.get_errno(), "cannot open the ring buffer (bpf_new_ringbuf)")

    def poll(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for records and hand over those available."""
        self._lib.bpf_poll_ringbuf(self._rb, timeout_ms)

    def consume(self) -> None:
        """Hand over every record available now, without waiting."""
        self._lib.bpf_consume_ringbuf(self._rb)

    def close(self) -> None:
        if self._rb:
            self._lib.bpf_free_ringbuf(self._rb)
            self._rb = None
