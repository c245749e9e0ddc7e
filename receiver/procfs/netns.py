"""Reading the kernel's network state as the node's own namespace, or another one, sees it.

``/proc/net`` is ``/proc/self/net``: the namespace of the process's *main* thread, whatever
namespace the reading thread is in. Another namespace is read by moving only the polling
thread into it with ``setns(2)`` (one thread of a multi-threaded process may enter a network
namespace) and reading ``/proc/thread-self/net``, which follows the calling thread; netlink
sockets it creates meanwhile belong to that namespace too. No file descriptor into the
namespace is kept between polls: holding one would keep a deleted pod's namespace, and its
veth, alive.
"""
from __future__ import annotations

import ctypes
import os
from typing import Callable, Iterable, TypeVar

CLONE_NEWNET = 0x40000000
THREAD_NET = "/proc/thread-self/net"

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns exists from Python 3.12; the agent runs on Debian's 3.11.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def read_text(path: str) -> str:
    """A whole proc file. Unbuffered ``read()`` loops until EOF, which seq files need
    (their size is 0 and one read returns at most a page or so)."""
    with open(path, "rb", buffering=0) as f:
        return f.read().decode("utf-8", "replace")


def read_files(directory: str, files: Iterable[str]) -> dict[str, str | OSError]:
    """Each file's text, or the error reading it."""
    out: dict[str, str | OSError] = {}
    for name in files:
        try:
            out[name] = read_text(os.path.join(directory, name))
        except OSError as exc:
            out[name] = exc
    return out


class NamespaceReturnError(RuntimeError):
    """The polling thread could not return to its own namespace after visiting another one."""


def in_netns(ns_path: str, fn: Callable[[], T]) -> T:
    """``fn()`` run by the calling thread inside the network namespace at ``ns_path``.

    Raises OSError when the namespace cannot be opened or entered (it does not exist, it is
    not a network namespace, or CAP_SYS_ADMIN is missing). Call it from a thread other than
    the main one: while ``fn`` runs, the main thread's namespace is every thread's /proc/net.
    """
    target = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return fn()
            finally:
                try:
                    _setns(home)
                except OSError as exc:
                    # Cannot happen with a descriptor we hold; if it did, everything this
                    # thread reads afterwards would describe the wrong namespace.
                    raise NamespaceReturnError(f"cannot return to the agent's network namespace: {exc}") from exc
        finally:
            os.close(home)
    finally:
        os.close(target)
