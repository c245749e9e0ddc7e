"""The kernel's DNS parser and matcher (bpf/dns.h) on crafted packets, run by the kernel
itself (BPF_PROG_TEST_RUN on the real tc program): what it counts under which key, what it
calls malformed, and how it pairs a response with its request.

The expectations are RFC 1035's rules (label lengths ≤ 63, a name ≤ 255 bytes on the wire,
label types 01 and 10 reserved, the first name cannot be a pointer) and FNV-1a 64 over the
lower-case wire name, computed here independently of the C code.
"""
from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from typing import Any, Iterator

import pytest

import bpf as bpf_sources
from flowtel.lib.bpf.testrun import prog_test_run
from receiver.ebpf.config import DnsConfig
from receiver.ebpf.dnsring import cflags, header_define, install_program

pytestmark = pytest.mark.kernel

CLIENT, SERVER = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
OK, MALFORMED = header_define("FLOWTEL_DNS_OK"), header_define("FLOWTEL_DNS_MALFORMED")


def fnv1a(wire_name: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in wire_name.lower():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def wire(name: str) -> bytes:
    """A name in wire form, root label included."""
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def message(qname: bytes, *, qid: int = 0x1111, flags: int = 0x0100, qdcount: int = 1, qtype: int = 1,
            tail: bytes | None = None) -> bytes:
    question = qname + struct.pack("!HH", qtype, 1) if tail is None else qname + tail
    return struct.pack("!HHHHHH", qid, flags, qdcount, 0, 0, 0) + question


def frame(payload: bytes, *, reply: bool, port: int = 40000, server: bytes = SERVER) -> bytes:
    """Ethernet + IPv4 + UDP around a DNS payload (client port ``port``, server port 53)."""
    src, dst, sport, dport = (server, CLIENT, 53, port) if reply else (CLIENT, server, port, 53)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst) + udp
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + ip


# A test run's packet arrives by loopback unless told otherwise: here it stands for a host-side
# pod interface (the agent puts those in dns_pod_ifaces), where every message is counted.
LOOPBACK = 1


def load(**dns: Any) -> tuple[Any, Any]:
    """tc_flow.c with DNS configured as ``dns``, loopback a pod interface."""
    from bcc import BPF  # type: ignore[import-untyped]
    defines: dict[str, int | str] = {"FLOWTEL_MAX_FLOWS": 1024, "FLOWTEL_IFACE_SLOTS": 16}
    defines.update(cflags(DnsConfig.model_validate(dns)))
    b = BPF(text=bpf_sources.source("tc_flow.c"), cflags=bpf_sources.cflags(**defines))
    fn = b.load_func("flowtel_tc", BPF.SCHED_CLS)
    install_program(b)
    set_pod_interface(b, LOOPBACK)
    return b, fn


def set_pod_interface(b: Any, ifindex: int) -> None:
    b["dns_pod_ifaces"][ctypes.c_uint32(ifindex)] = ctypes.c_uint8(header_define("FLOWTEL_DNS_POD_IFACE"))


@pytest.fixture(scope="module")
def prog() -> Iterator[Any]:
    b, fn = load(sample_rate=1_000_000)
    yield b, fn
    b.cleanup()


def run(prog: Any, packet: bytes, ifindex: int = 0) -> None:
    _, fn = prog
    assert prog_test_run(fn.fd, packet, ifindex=ifindex).retval == 0xFFFFFFFF  # TC_ACT_UNSPEC: an observer


def take_keys(prog: Any) -> dict[tuple[int, int, int, int, int], int]:
    """(status, is_response, rcode, qtype, name_hash) -> messages, from the active buffer, emptied
    (as the agent's drain does it)."""
    from receiver.ebpf.dnsmaps import _AggBuffer
    b, _ = prog
    out: dict[tuple[int, int, int, int, int], int] = {}
    buf = _AggBuffer(b, 0)
    names = buf.names
    for row in buf.drain():
        e = dict(zip(names, row))
        if e["messages"]:
            k = (e["key.status"], e["key.is_response"], e["key.rcode"], e["key.qtype"], e["key.name_hash"])
            out[k] = out.get(k, 0) + e["messages"]
    return out


def counter(prog: Any, name: str) -> int:
    b, _ = prog
    return int(b["dns_counters"].sum(ctypes.c_int(header_define(f"FLOWTEL_DNS_CNT_{name}"))).value)


L63 = "a" * 63
NAME_255 = ".".join([L63, L63, L63, "b" * 61])  # 3 × 64 + 62 + root = 255 bytes on the wire
NAME_256 = ".".join([L63, L63, L63, "b" * 62])

CASES = [
    # (what, DNS payload, expected (status, is_response, rcode, qtype, name hash))
    ("mixed case hashes as lower case", message(wire("Web.EXAMPLE.")), (OK, 0, 0, 1, fnv1a(wire("web.example")[:-1]))),
    ("AAAA", message(wire("web.example."), qtype=28), (OK, 0, 0, 28, fnv1a(wire("web.example")[:-1]))),
    ("a 63-byte label", message(wire(L63 + ".x.")), (OK, 0, 0, 1, fnv1a(wire(L63 + ".x")[:-1]))),
    ("a 255-byte name", message(wire(NAME_255)), (OK, 0, 0, 1, fnv1a(wire(NAME_255)[:-1]))),
    ("the root name", message(b"\x00", qtype=2), (OK, 0, 0, 2, fnv1a(b""))),
    ("no question (qdcount 0)", message(b"", qdcount=0, tail=b""), (OK, 0, 0, 0, 0)),
    ("an NXDOMAIN response", message(wire("nx.example."), flags=0x8183), (OK, 1, 3, 1, fnv1a(wire("nx.example")[:-1]))),
    ("a 256-byte name", message(wire(NAME_256)), (MALFORMED, 0, 0, 0, 0)),
    ("label length 64 (type 01)", message(b"\x40" + b"a" * 64 + b"\x00"), (MALFORMED, 0, 0, 0, 0)),
    ("label type 10", message(b"\x80abc\x00"), (MALFORMED, 0, 0, 0, 0)),
    ("a pointer as the first name", message(b"\xc0\x0c"), (MALFORMED, 0, 0, 0, 0)),
    ("question cut in qtype", message(wire("web.example."), tail=b"\x00"), (MALFORMED, 0, 0, 0, 0)),
    ("name runs past the message", message(b"\x05ab", tail=b""), (MALFORMED, 0, 0, 0, 0)),
    ("shorter than a header", b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00", (MALFORMED, 0, 0, 0, 0)),
    ("empty", b"", (MALFORMED, 0, 0, 0, 0)),
]


@pytest.mark.parametrize("what, payload, key", CASES, ids=[c[0] for c in CASES])
def test_each_message_is_counted_under_the_key_rfc_1035_gives_it(prog: Any, what: str, payload: bytes,
                                                                 key: tuple[int, int, int, int, int]) -> None:
    take_keys(prog)
    run(prog, frame(payload, reply=bool(key[1]), port=41000 + CASES.index((what, payload, key))))
    assert take_keys(prog) == {key: 1}, what


def pending(b: Any) -> int:
    """Requests waiting in dns_pending (ways whose time is set)."""
    return sum(1 for s in b["dns_pending"].values() for w in s.way if w.ts_ns)


def clear_pending(b: Any) -> None:
    table = b["dns_pending"]
    for i in range(len(table)):
        table[ctypes.c_int(i)] = table.Leaf()


def test_a_response_is_matched_to_its_request_once_and_retransmissions_keep_the_first(prog: Any) -> None:
    b, _ = prog
    clear_pending(b)
    lat = lambda: sum(cpu.count for cpu in b["dns_latency"][ctypes.c_int(0)])  # noqa: E731
    before_lat, before_rt, before_un = lat(), counter(prog, "RETRANSMITS"), counter(prog, "UNMATCHED")
    q = message(wire("pair.example."), qid=0x2222)
    r = message(wire("pair.example."), qid=0x2222, flags=0x8180)
    run(prog, frame(q, reply=False, port=42000))
    run(prog, frame(q, reply=False, port=42000))  # the client asks again: one exchange
    assert counter(prog, "RETRANSMITS") == before_rt + 1 and pending(b) == 1
    run(prog, frame(message(wire("pair.example."), qid=0x2223, flags=0x8180), reply=True, port=42000))  # other id
    run(prog, frame(r, reply=True, port=42001))  # other client port
    assert lat() == before_lat and counter(prog, "UNMATCHED") == before_un + 2
    run(prog, frame(r, reply=True, port=42000))
    assert lat() == before_lat + 1 and pending(b) == 0
    run(prog, frame(r, reply=True, port=42000))  # a duplicate answer matches nothing
    assert lat() == before_lat + 1 and counter(prog, "UNMATCHED") == before_un + 3
    assert sum(take_keys(prog).values()) == 6  # every message counted, matched or not


@pytest.fixture(scope="module")
def links() -> Iterator[tuple[int, int]]:
    """Two links of this test's own (a veth pair, never up) whose indexes test runs can name."""
    import subprocess
    a, b = f"dk{os.getpid() % 100000}a", f"dk{os.getpid() % 100000}b"
    subprocess.run(["ip", "link", "del", a], capture_output=True)  # left by a killed run
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    try:
        yield socket.if_nametoindex(a), socket.if_nametoindex(b)
    finally:
        subprocess.run(["ip", "link", "del", a], capture_output=True)


def latencies(b: Any) -> int:
    return sum(cpu.count for cpu in b["dns_latency"][ctypes.c_int(0)])


def test_an_exchange_is_paired_by_its_client_end_wherever_each_message_was_counted(
        prog: Any, links: tuple[int, int]) -> None:
    """Each message is counted once, at the first pod interface it crosses: the request at the
    client's, the response at the server's, which a Service's DNAT put behind another address
    than the one the client asked. The pair is still one exchange: timed, nothing unmatched."""
    b, _ = prog
    server_if, _ = links
    set_pod_interface(b, server_if)
    clear_pending(b)
    take_keys(prog)
    before_lat, before_un = latencies(b), counter(prog, "UNMATCHED")
    behind = bytes([10, 9, 0, 3])  # the pod that answers for SERVER (a ClusterIP)
    run(prog, frame(message(wire("svc.example."), qid=0x5555), reply=False, port=47000))  # at the client's
    run(prog, frame(message(wire("svc.example."), qid=0x5555, flags=0x8180), reply=True, port=47000, server=behind),
        ifindex=server_if)  # at the server's
    assert latencies(b) == before_lat + 1 and pending(b) == 0 and counter(prog, "UNMATCHED") == before_un
    assert sum(take_keys(prog).values()) == 2


def test_a_non_pod_interface_counts_only_the_hosts_own_exchanges(prog: Any, links: tuple[int, int]) -> None:
    """The uplink (no pod interface) receives what it will hand to a pod, with the addresses
    before the node's NAT is undone: not counted there but where it reaches the pod. A response
    there counts only if it answers a request the host sent out that way."""
    b, _ = prog
    _, uplink = links
    clear_pending(b)
    take_keys(prog)
    before_lat, before_un, before_not = latencies(b), counter(prog, "UNMATCHED"), counter(prog, "NOT_HERE")
    q = message(wire("up.example."), qid=0x6666)
    r = message(wire("up.example."), qid=0x6666, flags=0x8180)
    run(prog, frame(q, reply=False, port=48000), ifindex=uplink)  # a request to a pod of this node
    run(prog, frame(r, reply=True, port=48001), ifindex=uplink)  # a response nobody here asked for
    assert take_keys(prog) == {} and pending(b) == 0
    assert counter(prog, "NOT_HERE") == before_not + 2 and counter(prog, "UNMATCHED") == before_un
    run(prog, frame(q, reply=False, port=48002))  # a pod's request, counted at its interface
    run(prog, frame(r, reply=True, port=48002), ifindex=uplink)  # its answer comes in by the uplink
    assert pending(b) == 1 and latencies(b) == before_lat and counter(prog, "NOT_HERE") == before_not + 3
    run(prog, frame(r, reply=True, port=48002))  # and is counted, and timed, where it reaches the pod
    assert pending(b) == 0 and latencies(b) == before_lat + 1 and counter(prog, "UNMATCHED") == before_un
    assert sum(take_keys(prog).values()) == 2


def test_a_full_pending_table_is_counted_and_its_requests_still_are_messages() -> None:
    small = load(max_pending=16)
    b = small[0]
    try:
        # 64 exchanges into 4 sets of 4 ways (the sets are chosen by a hash seeded per load):
        # every set fills but with a chance of ~1e-5.
        for i in range(64):
            run(small, frame(message(wire("full.example."), qid=i), reply=False, port=43000))
        assert pending(b) == 16
        assert counter(small, "PENDING_FULL") == 64 - 16 and counter(small, "RETRANSMITS") == 0
        assert sum(take_keys(small).values()) == 64
    finally:
        b.cleanup()


def tcp_frame(payload: bytes, *, seq: int, port: int) -> bytes:
    """Ethernet + IPv4 + TCP (ACK|PSH, no options) from the client's ``port`` to port 53."""
    tcp = struct.pack("!HHIIBBHHH", port, 53, seq, 1, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, CLIENT, SERVER) + tcp
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + ip


def framed(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


def test_tcp_counts_the_first_message_of_a_segment_and_skips_what_continues_a_message(prog: Any) -> None:
    """RFC 7766 framing in the kernel: a segment's first message is counted; messages after it
    in the segment are counted as not parsed; a message running past its segment marks where
    the next starts, so the segment that continues it is skipped, not read as a message."""
    take_keys(prog)
    unparsed, cont = counter(prog, "TCP_UNPARSED"), counter(prog, "TCP_CONTINUATIONS")
    name = wire("tcp.example.")
    key = (OK, 0, 0, 1, fnv1a(name[:-1]))
    one, two = framed(message(name, qid=1)), framed(message(name, qid=2))
    run(prog, tcp_frame(one + two, seq=1000, port=44000))  # pipelined: the second is not parsed
    assert take_keys(prog) == {key: 1}
    assert counter(prog, "TCP_UNPARSED") == unparsed + 1

    big = framed(message(name, qid=3) + bytes(300))  # 300 bytes of records after the question
    run(prog, tcp_frame(big[:100], seq=5000, port=44001))  # header and question: counted
    run(prog, tcp_frame(big[100:], seq=5100, port=44001))  # only the rest of it: skipped
    run(prog, tcp_frame(framed(message(name, qid=4)), seq=5000 + len(big), port=44001))  # the next one
    assert take_keys(prog) == {key: 2}
    assert counter(prog, "TCP_CONTINUATIONS") == cont + 1 and counter(prog, "TCP_UNPARSED") == unparsed + 1

    run(prog, tcp_frame(framed(message(name, qid=5))[:8], seq=9000, port=44002))  # question cut off
    run(prog, tcp_frame(framed(message(name, qid=5))[8:], seq=9008, port=44002))
    assert take_keys(prog) == {}
    assert counter(prog, "TCP_UNPARSED") == unparsed + 2 and counter(prog, "TCP_CONTINUATIONS") == cont + 2


def test_the_sweep_frees_only_expired_requests_and_a_late_response_then_matches_nothing(prog: Any) -> None:
    """flowtel_dns_sweep (run by DnsMaps.expire) hands over each timed-out request once, with
    its key, and leaves young ones to their response."""
    from receiver.ebpf.dnsmaps import DnsMaps
    b, _ = prog
    clear_pending(b)
    maps = DnsMaps(b, {"SAMPLES": 0}, header_define("FLOWTEL_DNS_SWEEP_SETS"))
    old = message(wire("late.example."), qid=0x3333)
    run(prog, frame(old, reply=False, port=45000))
    cut = time.monotonic_ns()
    young = message(wire("young.example."), qid=0x4444)
    run(prog, frame(young, reply=False, port=45001))
    assert pending(b) == 2
    expired = maps.expire(cut)
    assert [(e.client, e.server, e.client_port, e.server_port, e.id, e.name_hash) for e in expired] == \
        [(CLIENT + bytes(12), SERVER + bytes(12), 45000, 53, 0x3333, fnv1a(wire("late.example.")[:-1]))]
    assert pending(b) == 1 and maps.expire(cut) == []  # handed over once
    unmatched = counter(prog, "UNMATCHED")
    run(prog, frame(message(wire("late.example."), qid=0x3333, flags=0x8180), reply=True, port=45000))
    assert counter(prog, "UNMATCHED") == unmatched + 1  # its request is gone: not timed twice
    lat = sum(cpu.count for cpu in b["dns_latency"][ctypes.c_int(0)])
    run(prog, frame(message(wire("young.example."), qid=0x4444, flags=0x8180), reply=True, port=45001))
    assert sum(cpu.count for cpu in b["dns_latency"][ctypes.c_int(0)]) == lat + 1 and pending(b) == 0
    take_keys(prog)


def test_full_aggregation_buffers_count_every_message_and_the_drain_makes_room_again() -> None:
    """More keys than max_aggregates: each message is in a key or in UNKEYED_*, never lost;
    the drain (entries by count, the way index zeroed) gives the next interval its room back."""
    small = load(max_aggregates=256)
    b = small[0]
    try:
        names = [wire(f"n{i}.full.example.") for i in range(300)]
        for i, name in enumerate(names):
            run(small, frame(message(name, qid=i), reply=False, port=46000))
        run(small, frame(message(names[0], qid=999), reply=False, port=46000))  # a known key: counted in it
        keys = take_keys(small)
        unkeyed = counter(small, "UNKEYED_REQUESTS")
        assert len(keys) <= 256 and sum(keys.values()) + unkeyed == 301
        assert keys[(OK, 0, 0, 1, fnv1a(names[0][:-1]))] == 2
        assert unkeyed >= 300 - 256
        run(small, frame(message(names[299], qid=1000), reply=False, port=46000))
        assert take_keys(small) == {(OK, 0, 0, 1, fnv1a(names[299][:-1])): 1}  # room again
        assert counter(small, "UNKEYED_REQUESTS") == unkeyed
    finally:
        b.cleanup()
