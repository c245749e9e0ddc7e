"""The proxy's flow log: Hubble JSON lines written by a thread of their own.

Decisions are recorded on the query path (the UDP loop, TCP handlers) and datapath drops on
the events thread; encoding a flow as JSON and writing it there would cost each query ~18 µs
more (a line-buffered write is a syscall per line). Instead a record is queued (a deque append)
and a writer thread turns what has queued up into one buffered write every
:data:`FLUSH_INTERVAL_S`. The queue is bounded: when the writer falls behind (a slow disk) a
new record is not queued but counted as lost (``queue_full``), so the query path never waits
for the file; a failed write loses its batch, counted (``write_error``) and logged.
"""
from __future__ import annotations

import collections
import json
import logging
import threading
import time
from typing import Any, Callable

from flowtel.hubble import flow_to_dict
from flowtel.records import Flow

log = logging.getLogger("flowtel.dnsproxy")

# How long a record may wait for the file (tests and `tail -f` see flows this late at most).
FLUSH_INTERVAL_S = 0.05
# Records waiting at once: ~3 s of a proxy at 20k queries/s, some 30 MB of Flow objects at most.
MAX_QUEUED = 65536
# A failing file (disk full, removed mount) is logged at most this often (seconds).
ERROR_LOG_INTERVAL_S = 30.0


class FlowLogWriter:
    """Appends flows to ``path`` from a writer thread; :meth:`write` never blocks on the file."""

    def __init__(self, path: str, *, max_queued: int = MAX_QUEUED, flush_interval_s: float = FLUSH_INTERVAL_S,
                 encode: Callable[[Flow], str] | None = None, autostart: bool = True) -> None:
        self.path = path
        # Unbuffered: each batch is one write of its own, and a failed one leaves nothing behind
        # in a buffer to come out later. Opened here: a bad path stops the start.
        self._file = open(path, "ab", buffering=0)
        self._queue: collections.deque[Flow] = collections.deque()
        self._max_queued = max_queued
        self._interval = flush_interval_s
        self._encode = encode or encode_flow
        self._lock = threading.Lock()  # the lost counters only (several threads record)
        self.lost: dict[str, int] = {"queue_full": 0, "write_error": 0}
        self.written = 0
        self._error_log_next = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if autostart:
            self.start()

    def start(self, supervisor: Any = None) -> None:
        """Start the writer thread (once); through ``supervisor`` (dnsproxy/supervise.py) when given."""
        if self._thread is not None:
            return
        if supervisor is not None:
            self._thread = supervisor.start("dnsproxy-flowlog", self._run)
        else:
            self._thread = threading.Thread(target=self._run, name="dnsproxy-flowlog", daemon=True)
            self._thread.start()

    def write(self, flow: Flow) -> None:
        """Queue one flow (any thread). Full queue: counted as lost, never waited for."""
        # len() and append() are each atomic under the GIL; a few records past the bound when
        # threads race are harmless, it bounds memory, not an exact count.
        if len(self._queue) >= self._max_queued:
            with self._lock:
                self.lost["queue_full"] += 1
            return
        self._queue.append(flow)

    def lost_total(self) -> dict[str, int]:
        with self._lock:
            return dict(self.lost)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        q = self._queue
        lines = []
        try:
            while True:
                lines.append(self._encode(q.popleft()))
        except IndexError:
            pass
        if not lines:
            return
        data = memoryview("".join(lines).encode())
        try:
            while data:  # a regular file takes it whole; a pipe or a full disk may take part
                data = data[self._file.write(data):]
            self.written += len(lines)
        except (OSError, ValueError) as exc:  # ValueError: the file object was closed under us
            with self._lock:
                self.lost["write_error"] += len(lines)
            now = time.monotonic()
            if now >= self._error_log_next:
                self._error_log_next = now + ERROR_LOG_INTERVAL_S
                log.error("flow log %s: writing %d records failed: %s (lost records are counted in "
                          "flowtel_dnsproxy_flow_log_lost_total)", self.path, len(lines), exc)

    def close(self) -> None:
        """Write what is queued, then close the file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        else:
            self._drain()
        try:
            self._file.close()
        except OSError as exc:
            log.error("flow log %s: closing failed: %s", self.path, exc)


def encode_flow(flow: Flow) -> str:
    """One line of the file exporter's envelope: ``{"flow": …, "node_name": …, "time": …}``."""
    body = flow_to_dict(flow)
    return json.dumps({"flow": body, "node_name": flow.node_name, "time": body.get("time")}) + "\n"
