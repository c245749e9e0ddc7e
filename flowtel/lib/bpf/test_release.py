"""release_compiler_memory: which mappings may be dropped, and a real process after the drop.

The kernel test compiles a program in a fresh interpreter, releases, checks that LLVM's code
left the resident set and that the process still compiles and runs a program afterwards (the
pages fault back in from the page cache)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flowtel.lib.bpf.release import droppable

_SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 08:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                1024 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
7f0000100000-7f0000400000 r-xp 00100000 08:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                2048 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
7f0000400000-7f0000500000 r--p 00400000 08:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                 512 kB
Anonymous:           512 kB
Private_Dirty:       512 kB
Shared_Dirty:          0 kB
7f0000500000-7f0000600000 rw-p 00500000 08:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                 256 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
7f0000600000-7f0000700000 r-xp 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 900 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
7f0000700000-7f0000800000 r-xp 00000000 08:01 13 /usr/lib/llvm-14/lib/libclang-cpp.so.14
Rss:                   0 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
7f0000800000-7f0000900000 rw-p 00000000 00:00 0
Rss:                 100 kB
Anonymous:           100 kB
Private_Dirty:       100 kB
Shared_Dirty:          0 kB
"""


def test_only_clean_read_only_resident_compiler_pages_are_dropped() -> None:
    # Kept: RELRO (relocated, private), the writable data, libc, nothing resident, anonymous memory.
    assert droppable(_SMAPS) == [(0x7f0000000000, 0x7f0000100000, 1024 * 1024),
                                 (0x7f0000100000, 0x7f0000400000, 2048 * 1024)]


_PROCESS = r"""
import json
from bcc import BPF
from flowtel.lib.bpf.release import droppable, release_compiler_memory
def compiler_kb():
    return sum(r for _, _, r in droppable(open("/proc/self/smaps").read())) // 1024
BPF(text=b"int f(void *ctx) { return 0; }").cleanup()
before = compiler_kb()
released = release_compiler_memory()
after = compiler_kb()
b = BPF(text=b"int g(struct __sk_buff *skb) { return 1; }")
fn = b.load_func("g", BPF.SOCKET_FILTER)
print(json.dumps({"before": before, "after": after, "text": released.text_bytes, "fd": fn.fd}))
"""


@pytest.mark.kernel
def test_a_process_gives_llvms_code_back_and_still_compiles() -> None:
    out = subprocess.run([sys.executable, "-c", _PROCESS], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] > 20 * 1024  # a compile touches tens of MB of LLVM and clang code
    assert got["after"] == 0
    assert got["text"] >= got["before"] * 1024
    assert got["fd"] > 0  # compiled and loaded after the release
