"""The drop program's per-CPU "last drop" cache (bpf/kernel_events.c, ``struct drop_cache_entry``)
loses nothing across drains.

Two kinds of drops at once, with a collection interval of 0.1 s so that the active buffer flips
dozens of times in mid-flood: a 64-byte UDP flood into one full socket (the same drop key drop
after drop: its counts sit in the cache, and may never reach the map), and datagrams sent
alternately to two closed ports (the key changes at every drop: each drop moves the previous
key's counts from the cache into the map). Checked against the kernel's own counters of the
receiving namespace: the flood's drop flows equal ``UdpRcvbufErrors``, the closed ports' equal
``NoPorts`` and what was sent to each, packets and bytes exactly, with one record per key and
drain (a key the cache and the map both held is merged, not reported twice). The programs are
detached right after the flood, so the final drain must take the flood's last counts from the
caches: with the merge off (no ``cache=`` on the drop flows' double buffer) the flood's drop flows fall short.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from flowtel.component import Telemetry
from flowtel.records import Flow, Verdict
from receiver.ebpf.kernel_events import KernelEvents, KernelEventsConfig
from testbed import Testbed
from tests.support.kernel_events import FLOOD, FULL_SOCKET, Collector, udp_mib

pytestmark = pytest.mark.kernel

INTERVAL = 0.1
FLOOD_PORT = 47500
CLOSED_PORTS = (47501, 47502)
ALTERNATIONS = 20_000  # datagrams to each closed port

_ALTERNATE = r"""
import socket, sys
dst, p1, p2, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    for port in (p1, p2):
        try:
            s.sendto(b"y" * 10, (dst, port))  # no socket there: one NO_SOCKET drop each
        except OSError:
            pass  # an ICMP port unreachable reported on the socket: the datagram did go
"""


def test_drop_cache_counts_equal_the_kernel_counters_across_flips(bed: Testbed) -> None:
    sink = Collector()
    ke = KernelEvents(KernelEventsConfig(collection_interval=INTERVAL, poll_interval=0.05, tcp={"enabled": False}),
                      "test-node", Telemetry(), sink)
    ke.start()
    try:
        a, b = bed.add_pod("dcache-a"), bed.add_pod("dcache-b")
        server = b.popen([sys.executable, "-c", FULL_SOCKET, str(FLOOD_PORT)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            before = udp_mib(b)
            mark = sink.mark()
            t0 = time.monotonic()
            alternate = threading.Thread(target=lambda: a.exec(
                [sys.executable, "-c", _ALTERNATE, b.ipv4, *map(str, CLOSED_PORTS), str(ALTERNATIONS)], timeout=120))
            alternate.start()
            a.exec([sys.executable, "-c", FLOOD, b.ipv4, str(FLOOD_PORT), "3"], timeout=60)
            alternate.join(120)
            elapsed = time.monotonic() - t0
            after = udp_mib(b)
            # Detached at once, before another drop on the machine (the tracepoint is global)
            # can move the flood's last counts from a CPU's cache into the map: what the caches
            # hold now reaches the records only through the final drain's merge.
            ke.stop()
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(10)
        refused = after["RcvbufErrors"] - before["RcvbufErrors"]
        no_ports = after["NoPorts"] - before["NoPorts"]
        assert refused > 20_000, f"the flood was too slow to prove anything ({refused} drops)"
        assert no_ports == 2 * ALTERNATIONS

        want = {(FLOOD_PORT, "SOCKET_RCVBUFF"): refused,
                **{(p, "NO_SOCKET"): ALTERNATIONS for p in CLOSED_PORTS}}

        def ours(f: Flow) -> bool:
            # Only the reasons the kernel counters above count (the full socket's few queued
            # datagrams are freed with other reasons when it closes).
            return (f.verdict == Verdict.DROPPED and f.src_ip == a.ipv4 and f.dst_ip == b.ipv4
                    and (f.dst_port, f.drop_reason) in want)

    finally:
        ke.stop()  # a second stop does nothing
    flows = sink.flows(ours, mark)
    got = Counter[tuple[int, str]]()
    got_bytes = Counter[tuple[int, str]]()
    records = Counter[tuple[int, str]]()
    for f in flows:
        key = (f.dst_port, f.drop_reason or "")
        got[key] += f.packets
        got_bytes[key] += f.bytes
        records[key] += 1
    assert dict(got) == want
    # skb->len where the kernel refused them: the UDP header already pulled, payload only.
    assert got_bytes[(FLOOD_PORT, "SOCKET_RCVBUFF")] == refused * 18
    # No socket: freed in udp_rcv before the header is pulled (IP payload: 8 + 10 bytes).
    assert {got_bytes[(p, "NO_SOCKET")] for p in CLOSED_PORTS} == {ALTERNATIONS * 18}
    # The flood spanned many drains (flips in mid-flood), and no key has two records in one
    # drain: at most one record per key per drain of the flood's span.
    drains = elapsed / INTERVAL
    assert records[(FLOOD_PORT, "SOCKET_RCVBUFF")] >= 5, records
    assert all(n <= drains + 20 for n in records.values()), (records, drains)
