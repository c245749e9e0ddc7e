"""trim_heap gives freed heap inside glibc's arena back to the kernel (the agent calls it each minute)."""
from __future__ import annotations

import json
import subprocess
import sys

_PROCESS = r"""
import json
from flowtel.pipeline import trim_heap
def anon_kb():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0])
blocks = [bytes(2000) for _ in range(50_000)]  # ~100 MB from malloc (above obmalloc's 512 bytes)
keep = blocks[::50]  # one survivor every 100 KB: the heap cannot shrink from the top
del blocks
before = anon_kb()
trim_heap()
print(json.dumps({"before": before, "after": anon_kb(), "kept": len(keep)}))
"""


def test_freed_heap_inside_the_arena_goes_back_to_the_kernel() -> None:
    out = subprocess.run([sys.executable, "-c", _PROCESS], capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] - got["after"] > 50 * 1024, got  # most of the ~98 MB freed
