"""What the kernel-event tests share: a collecting consumer, the namespaces' own TCP/UDP MIB
counters (the truth the tests compare against), and the small socket programs they run in pods.

Kept here rather than imported from one test module by another, so that a test file can be
run, moved or rewritten on its own.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable

from flowtel.records import Flow
from testbed import Pod
from tests.support.flowlog import check_wire_form


class Collector:
    """A consumer that keeps every batch; ``hold()`` makes the next batch block until released."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[object] = []
        self._hold = threading.Event()
        self.held = threading.Event()
        self._release = threading.Event()

    def consume(self, batch: list[object]) -> None:
        if self._hold.is_set() and any(isinstance(r, Flow) for r in batch):
            self._hold.clear()
            self.held.set()
            self._release.wait(30)
        with self._lock:
            self.records.extend(batch)

    def hold(self) -> None:
        self._release.clear()
        self._hold.set()

    def release(self) -> None:
        self._release.set()

    def mark(self) -> int:
        """Where the records of what happens next begin (pod addresses repeat between tests)."""
        with self._lock:
            return len(self.records)

    def flows(self, pred: Callable[[Flow], bool], since: int = 0) -> list[Flow]:
        with self._lock:
            got = [r for r in self.records[since:] if isinstance(r, Flow) and pred(r)]
        for flow in got:  # every record of real kernel events has a valid Hubble wire form
            check_wire_form(flow)
        return got

    def wait_flows(self, pred: Callable[[Flow], bool], count: int, since: int = 0, timeout: float = 10) -> list[Flow]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.flows(pred, since)
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

def tcp_mib(pod: Pod) -> dict[str, int]:
    """The Tcp: line of /proc/net/snmp as the pod's own network namespace counts it."""
    lines = [line.split() for line in pod.exec(["cat", "/proc/net/snmp"]).stdout.splitlines() if line.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))

def udp_mib(pod: Pod) -> dict[str, int]:
    lines = [line.split() for line in pod.exec(["cat", "/proc/net/snmp"]).stdout.splitlines() if line.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))

def udp_sendto(pod: Pod, dst: str, port: int, count: int, size: int) -> tuple[int, int]:
    out = pod.exec([sys.executable, "-c", UDP_SENDTO, dst, str(port), str(count), str(size)]).stdout.split()
    return int(out[0]), int(out[1])

UDP_SENDTO = r"""
import socket, sys
dst, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
refused = 0
for _ in range(count):
    try:
        s.sendto(b"x" * size, (dst, port))
    except PermissionError:  # dropped by netfilter on the way out
        refused += 1
print(s.getsockname()[1], refused)
"""

CONNECT_REFUSED = r"""
import json, socket, sys
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ports = []
for _ in range(count):
    s = socket.socket()
    s.bind(("0.0.0.0", 0))  # keeps the port after the refusal, to report it
    ports.append(s.getsockname()[1])
    try:
        s.connect((dst, port))
        raise SystemExit("connected to a closed port?")
    except ConnectionRefusedError:
        pass
    s.close()
print(json.dumps(ports))
"""

FLOOD = r"""
import socket, sys, time
dst, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, port))
payload = b"x" * 18  # a 64-byte frame
end = time.monotonic() + seconds
sent = 0
while time.monotonic() < end:
    for _ in range(1000):
        try:
            s.send(payload)
            sent += 1
        except OSError:
            pass
print(sent)
"""

FULL_SOCKET = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum: full at once
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
sys.stdin.read()  # never reads the socket; until the test closes stdin
"""

ACCEPT_AND_CLOSE = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(4096)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.recv(16)
    conn.close()
"""

CONNECT_MANY = r"""
import socket, sys
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
done = 0
for _ in range(count):
    s = socket.create_connection((dst, port), timeout=10)
    s.sendall(b"x")
    s.close()
    done += 1
print(done)
"""
