"""A flood of drops from new flow keys is drained early, at a fill level, and loses nothing.

Drops are aggregated in the kernel per flow (addresses, ports, reason, …): datagrams to closed
ports of a pod, each to a new port (a client retrying against a resolver that is down, a port
scan), are each a new key, and the drop flow map fills long before the interval ends. Paced at
``RATE``/s for ``DATAGRAMS`` datagrams (2.4 x the map) in one 60 s interval: with the early drain
(the default) every drop is in a record exactly once and nothing is evicted; with it off, the
same workload overflows the same map (``DROP_FLOW_MAP_FULL``), so the test proves the early
drain, not a map that happened to be big enough. Truth: ``UdpNoPorts`` of the receiving pod's
own namespace (each datagram there is one ``NO_SOCKET`` drop).

The connection flow maps get the same early drain: a scan of closed ports is one ``closed``
key (SYN_SENT left) per port; truth ``AttemptFails`` of the scanning pod's namespace.
"""
from __future__ import annotations

import sys

import pytest

from flowtel.component import Telemetry
from flowtel.records import EventKind, Flow, LostEvents, Verdict
from receiver.ebpf.kernel_events import KernelEvents, KernelEventsConfig
from testbed import Testbed
from tests.support.kernel_events import Collector, tcp_mib, udp_mib

pytestmark = pytest.mark.kernel

MAX_FLOWS = 8192  # drained early at 4096
DATAGRAMS = 20_000
RATE = 4000  # new drop keys a second: 800 between two fill reads (the map has 4096 of room)
# The tracepoints are global: other runs' drops with new keys (a SYN to a closed port is one)
# fill the same maps, so the budget here is above what this workload needs (5), and the map
# has room for 20k foreign new keys/s besides.
BUDGET = 20
FIRST_PORT = 20000

_PACED_CLOSED_PORTS = r"""
import socket, sys, time
dst, first, count, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.monotonic()
for i in range(count):
    ahead = start + i / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
    s.sendto(b"x", (dst, first + i))  # no socket there: one NO_SOCKET drop, a new key each
"""


def _run(drain_at_fill: float) -> tuple[list[Flow], dict[str, int], int, int, int]:
    """(our drop flows, lost by source, NoPorts delta, early drains, records kept in total)."""
    sink = Collector()
    telemetry = Telemetry()
    config = KernelEventsConfig(collection_interval=60, poll_interval=0.05, tcp={"enabled": False},
                                drops={"max_flows": MAX_FLOWS}, drain_at_fill=drain_at_fill,
                                max_early_drains=BUDGET)
    Testbed.cleanup_stale()
    with Testbed() as bed:
        a, b = bed.add_pod("dropfill-a"), bed.add_pod("dropfill-b")
        ke = KernelEvents(config, "test-node", telemetry, sink)
        ke.start()
        try:
            before = udp_mib(b)["NoPorts"]
            a.exec([sys.executable, "-c", _PACED_CLOSED_PORTS, b.ipv4, str(FIRST_PORT), str(DATAGRAMS), str(RATE)],
                   timeout=120)
            no_ports = udp_mib(b)["NoPorts"] - before
        finally:
            ke.stop()  # detached, then the final drain of both maps
        flows = [r for r in sink.records if isinstance(r, Flow) and r.verdict == Verdict.DROPPED
                 and r.src_ip == a.ipv4 and r.dst_ip == b.ipv4 and FIRST_PORT <= r.dst_port < FIRST_PORT + DATAGRAMS]
        lost: dict[str, int] = {}
        for r in sink.records:
            if isinstance(r, LostEvents):
                lost[r.source] = lost.get(r.source, 0) + r.count
        return flows, lost, no_ports, telemetry.get("ebpf", "early_drains"), len(sink.records)


def test_drop_flood_of_new_keys_is_drained_early_and_loses_nothing() -> None:
    flows, lost, no_ports, early, _ = _run(0.5)
    why = f"{early} early drains, lost {lost}, {len(flows)} records, NoPorts {no_ports}"
    print(why)
    assert no_ports == DATAGRAMS, why
    assert "DROP_FLOW_MAP_FULL" not in lost, why
    # DATAGRAMS / 4096: four or five early drains (more if other runs drop new keys meanwhile).
    assert 3 <= early <= BUDGET, why
    # Every drop once: one record per port (a key is never cut: one packet each), their packets
    # the kernel's own count.
    assert sorted(f.dst_port for f in flows) == list(range(FIRST_PORT, FIRST_PORT + DATAGRAMS)), why
    assert sum(f.packets for f in flows) == no_ports and all(f.drop_reason == "NO_SOCKET" for f in flows), why


def test_without_the_early_drain_the_same_drops_overflow() -> None:
    flows, lost, no_ports, early, _ = _run(0.0)
    why = f"{early} early drains, lost {lost}, {len(flows)} records, NoPorts {no_ports}"
    assert no_ports == DATAGRAMS, why
    assert early == 0, why
    assert lost.get("DROP_FLOW_MAP_FULL", 0) > 0, why
    assert sum(f.packets for f in flows) < no_ports, why


def test_drain_at_fill_is_off_or_a_sensible_share() -> None:
    from pydantic import ValidationError

    assert KernelEventsConfig().drain_at_fill == 0.5
    assert KernelEventsConfig().max_early_drains == 8
    assert KernelEventsConfig(drain_at_fill=0).drain_at_fill == 0
    for bad in (0.01, 0.95, -0.1):
        with pytest.raises(ValidationError):
            KernelEventsConfig(drain_at_fill=bad)


_PACED_CLOSED_CONNECTS = r"""
import socket, sys, time
dst, first, count, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
start = time.monotonic()
for i in range(count):
    ahead = start + i / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
    s = socket.socket()
    try:
        s.connect((dst, first + i))  # refused: SYN_SENT -> CLOSE, a new connection key each
    except ConnectionRefusedError:
        pass
    s.close()
"""


def test_closed_port_scan_fills_the_connection_map_and_is_drained_early() -> None:
    sink = Collector()
    telemetry = Telemetry()
    config = KernelEventsConfig(collection_interval=60, poll_interval=0.05, drops={"enabled": False},
                                tcp={"events": False, "max_connection_flows": MAX_FLOWS}, max_early_drains=BUDGET)
    Testbed.cleanup_stale()
    with Testbed() as bed:
        a, b = bed.add_pod("connfill-a"), bed.add_pod("connfill-b")
        ke = KernelEvents(config, "test-node", telemetry, sink)
        ke.start()
        try:
            before = tcp_mib(a)["AttemptFails"]
            a.exec([sys.executable, "-c", _PACED_CLOSED_CONNECTS, b.ipv4, str(FIRST_PORT), str(DATAGRAMS), str(RATE)],
                   timeout=120)
            attempt_fails = tcp_mib(a)["AttemptFails"] - before
        finally:
            ke.stop()
    closed = [r for r in sink.records if isinstance(r, Flow) and r.kind == EventKind.TCP_CLOSED
              and r.src_ip == a.ipv4 and r.dst_ip == b.ipv4 and FIRST_PORT <= r.dst_port < FIRST_PORT + DATAGRAMS]
    lost = {r.source: r.count for r in sink.records if isinstance(r, LostEvents)}
    early = telemetry.get("ebpf", "early_drains")
    why = f"{early} early drains, lost {lost}, {len(closed)} records, AttemptFails {attempt_fails}"
    print(why)
    assert attempt_fails == DATAGRAMS, why
    assert "TCP_CONNECTION_FLOW_MAP_FULL" not in lost, why
    assert 3 <= early <= BUDGET, why
    assert sorted(r.dst_port for r in closed) == list(range(FIRST_PORT, FIRST_PORT + DATAGRAMS)), why
    assert all(r.extensions["connections"] == 1 and r.extensions["tcp_state"] == "SYN_SENT" for r in closed), why
