"""What the benchmarks that talk to a Kubernetes API share: the stand-in API server (tests/kubeapi)
run in a process of its own, so its CPU and memory are not the measured process's, and the
measured process's resident memory."""
from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing
import tempfile
from typing import Any, Callable


def rss_mb() -> float:
    """This process's resident set, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def settle() -> None:
    """Collect garbage and give freed heap back to the OS, so RSS shows what is kept, not what
    was parsed once."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def start_server(serve: Callable[[int, Any], None], pods: int) -> tuple[Any, Any, str]:
    """Run ``serve(pods, conn)`` in a child process; it sends its URL on ``conn`` once it has
    created its objects. Returns (process, parent end of the pipe, path of a kubeconfig for it)."""
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=serve, args=(pods, child), daemon=True)
    proc.start()
    url = parent.recv()
    with tempfile.NamedTemporaryFile("w", suffix=".kubeconfig", delete=False) as f:
        json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "b",
                   "clusters": [{"name": "b", "cluster": {"server": url}}], "users": [{"name": "b", "user": {}}],
                   "contexts": [{"name": "b", "context": {"cluster": "b", "user": "b"}}]}, f)
    return proc, parent, f.name
