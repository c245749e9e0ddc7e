"""One packet parser (bpf/packet.h) for every program: IPv6 extension headers are walked the
same way at tc (flows) and in the drop tracepoint (drop flows).

A pod sends UDP datagrams over IPv6 with a Destination Options header (RFC 3542
``IPV6_DSTOPTS``) to a closed port of another pod: the tc programs on both host veths must
count them under the UDP ports behind the extension header, and the kernel's NO_SOCKET drop
of each must carry the same ports (a parser that stopped at the extension header would report
port 0 and protocol 60). The DNS proxy's datapath (bpf/fqdn_policy.c) uses the same tc
instantiation of the parser; before it had its own, which did not walk extension headers.
"""
from __future__ import annotations

import sys
import threading
import time

import pytest

from flowtel.component import CreateSettings, Telemetry
from flowtel.records import Flow, Record, Verdict
from testbed import Testbed
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.receiver import EbpfReceiver

pytestmark = pytest.mark.kernel

PORT = 47300
COUNT = 3

_SEND_WITH_DSTOPTS = r"""
import socket, sys
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", 0))
# Destination Options header: next header (filled by the kernel), length 0 (8 bytes), PadN of 4.
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
for _ in range(count):
    s.sendto(b"x" * 20, (dst, port))
print(s.getsockname()[1])
"""


class _Sink:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def wants(self, signal: str) -> bool:
        return signal == "logs"

    def consume(self, batch: list[Record]) -> None:
        with self._lock:
            self.records.extend(batch)

    def flows(self) -> list[Flow]:
        with self._lock:
            return [r for r in self.records if isinstance(r, Flow)]


def test_ipv6_extension_headers_parse_alike_at_tc_and_in_the_drop_tracepoint(bed: Testbed) -> None:
    a, b = bed.add_pod("p6-a", ipv6=True), bed.add_pod("p6-b", ipv6=True)
    assert a.ipv6 and b.ipv6
    sink = _Sink()
    receiver = EbpfReceiver(
        CreateSettings("ebpf", "test-node", Telemetry()),
        EbpfReceiverConfig(interfaces=[bed.interface_glob], collection_interval=0.5, dns={"enabled": False},
                           kernel_events={"tcp": {"enabled": False}, "collection_interval": 0.5}),
        sink,
    )
    receiver.start()
    try:
        attach = receiver.attach_manager
        assert attach is not None
        deadline = time.monotonic() + 30
        while len({i.index for i in attach.attached().values()} & {a.host_ifindex, b.host_ifindex}) < 2:
            assert time.monotonic() < deadline, "not attached"
            time.sleep(0.05)
        sport = int(a.exec([sys.executable, "-c", _SEND_WITH_DSTOPTS, b.ipv6, str(PORT), str(COUNT)]).stdout)

        def tc(f: Flow) -> bool:
            return f.verdict == Verdict.FORWARDED and f.src_ip == a.ipv6 and f.dst_ip == b.ipv6 and f.protocol == 17

        def dropped(f: Flow) -> bool:
            return f.verdict == Verdict.DROPPED and f.src_ip == a.ipv6 and f.dst_ip == b.ipv6

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            flows = sink.flows()
            if (sum(f.packets for f in flows if tc(f)) >= 2 * COUNT
                    and sum(f.packets for f in flows if dropped(f)) >= COUNT):
                break
            time.sleep(0.1)
        time.sleep(1.2)  # two more drains: nothing more may come
        flows = sink.flows()
    finally:
        receiver.shutdown()
    on_veths = [f for f in flows if tc(f)]
    assert {(f.ifindex, f.src_port, f.dst_port) for f in on_veths} == {
        (a.host_ifindex, sport, PORT), (b.host_ifindex, sport, PORT)}, on_veths
    assert sum(f.packets for f in on_veths) == 2 * COUNT
    drops = [f for f in flows if dropped(f)]
    assert {(f.protocol, f.src_port, f.dst_port, f.drop_reason) for f in drops} == {(17, sport, PORT, "NO_SOCKET")}
    assert sum(f.packets for f in drops) == COUNT
