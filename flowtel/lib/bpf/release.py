"""Giving back the memory bcc's compile leaves behind, once every program is loaded.

A bcc compile runs clang and LLVM in the process. Afterwards two things stay resident that
the agent never uses again:

- the compiler's freed heap: glibc keeps freed chunks in its arenas (tens of MB after one
  compile of the agent's module); ``malloc_trim(0)`` returns every free page to the kernel;
- the compiler's code: the pages of ``libLLVM``/``libclang-cpp``/``libbcc`` text and
  read-only data the compile touched (≈ 75 MB). They are clean file-backed pages, so
  ``madvise(MADV_DONTNEED)`` only unmaps them: should anything call into LLVM again (another
  compile), the pages fault back in from the page cache. This is what bcc's own
  ``bcc_free_memory()`` does for a statically linked libbcc; Debian links LLVM and clang as
  separate libraries, which that function does not look at, hence this one.

Only mappings that are not writable and hold no private (anonymous, copy-on-write) or dirty
pages are dropped: a relocated read-only page (RELRO) is private memory whose contents exist
nowhere else, and dropping it would lose the relocation.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass

log = logging.getLogger("flowtel.lib.bpf.release")

MADV_DONTNEED = 4
# The compiler's libraries (bcc links them; every bcc program text goes through them once).
COMPILER_LIBRARIES = ("libLLVM", "libclang", "libbcc")


@dataclass(frozen=True, slots=True)
class Released:
    """What one release gave back, in resident bytes."""

    heap_bytes: int  # freed heap malloc_trim returned (RssAnon before − after)
    text_bytes: int  # compiler code and read-only data unmapped (RssFile of those mappings)


@dataclass(slots=True)
class _Mapping:
    start: int
    end: int
    perms: str
    path: str
    rss_kb: int = 0
    private_kb: int = 0  # Anonymous + Private_Dirty + Shared_Dirty: pages that exist only here


def _mappings(smaps: str) -> list[_Mapping]:
    out: list[_Mapping] = []
    cur: _Mapping | None = None
    for line in smaps.splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            fields = rest.split(None, 4)
            lo, _, hi = head.partition("-")
            cur = _Mapping(int(lo, 16), int(hi, 16), fields[0], fields[4].strip() if len(fields) > 4 else "")
            out.append(cur)
        elif cur is not None and head == "Rss:":
            cur.rss_kb = int(rest.split()[0])
        elif cur is not None and head in ("Anonymous:", "Private_Dirty:", "Shared_Dirty:"):
            cur.private_kb += int(rest.split()[0])
    return out


def droppable(smaps: str, libraries: tuple[str, ...] = COMPILER_LIBRARIES) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of each mapping of ``libraries`` that is safe to drop:
    not writable, resident, and holding only clean pages of its file."""
    out = []
    for m in _mappings(smaps):
        name = m.path.rsplit("/", 1)[-1]
        if not m.rss_kb or "w" in m.perms or m.private_kb or not name.startswith(libraries):
            continue
        out.append((m.start, m.end, m.rss_kb * 1024))
    return out


def _rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def release_compiler_memory() -> Released:
    """Return the compile's freed heap and unmap the compiler's clean code pages (see the module
    docstring). Call after the last compile of the process; harmless (only slower) if another
    compile follows. Never raises: memory not given back is a cost, not an error."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    heap = 0
    try:
        before = _rss_anon()
        libc.malloc_trim(ctypes.c_size_t(0))
        heap = max(0, before - _rss_anon())
    except (AttributeError, OSError):  # not glibc: its allocator decides
        pass
    text = 0
    try:
        regions = droppable(open("/proc/self/smaps").read())
    except OSError:
        regions = []
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    for start, end, resident in regions:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            text += resident
    released = Released(heap, text)
    log.info("released the compiler's memory: %.1f MB of freed heap, %.1f MB of LLVM/clang/bcc code pages",
             heap / 2**20, text / 2**20)
    return released
