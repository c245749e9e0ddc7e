"""Kernel time per run of each flowtel eBPF program, under known traffic through pods.

Not a test: run as root, ``.venv/bin/python -m bench.bpf_runtime``. It switches on
``kernel.bpf_stats_enabled`` (the kernel then accounts run count and run time per program),
attaches flowtel's programs as the agent does (the ``ebpf`` receiver: its tc programs on the
testbed's veths and the kernel-events tracepoints, one bcc module, with a logs and a metrics
consumer as in the shipped config, so every event path is compiled in), sends a fixed mix of traffic between
pods, prints ``run_time_ns / run_cnt`` per program from ``bpftool -j prog show``, and puts the
sysctl back as it found it.

tc programs run once per packet per hook on the testbed's veths only, so their ns/run is the
cost per packet. That figure includes whatever the machine's load does to caches and the
hypervisor's steal; so the tc programs are also run by the kernel itself in a tight loop on
fixed packets (``BPF_PROG_TEST_RUN``, the same flow each time: the steady-state cost of a
packet of a known flow), with ``bpf_stats`` off again (its accounting, two clock reads per
run, would otherwise be a large part of what is measured). Tracepoints are global: they also run for whatever else this machine does
meanwhile (and ``skb:kfree_skb`` only for drops), so their run counts include that.
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

from flowtel.component import CreateSettings, Telemetry
from flowtel.records import Record
from testbed import Pod, Testbed, send_ping, send_tcp, send_udp

STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


class _Discard:
    """Takes logs and metrics, as the shipped config's pipelines do, and keeps nothing."""

    def wants(self, signal: str) -> bool:
        return True

    def consume(self, batch: list[Record]) -> None:
        pass


@dataclass(frozen=True, slots=True)
class ProgStats:
    id: int
    name: str
    type: str
    run_cnt: int
    run_time_ns: int


def _own_program_ids() -> set[int]:
    """Ids of the BPF programs this process holds open (fdinfo of each program fd)."""
    ids = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def _stats(ids: set[int]) -> dict[int, ProgStats]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {
        p["id"]: ProgStats(p["id"], p.get("name", "?"), p.get("type", "?"), p.get("run_cnt", 0), p.get("run_time_ns", 0))
        for p in json.loads(out)
        if p["id"] in ids
    }


def _connect_many(pod: Pod, dst: str, port: int, count: int) -> None:
    code = (
        "import socket, sys\n"
        "for _ in range(int(sys.argv[3])):\n"
        "    s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); s.sendall(b'x'); s.close()\n"
    )
    pod.exec([sys.executable, "-c", code, dst, str(port), str(count)], timeout=120)


def _sendto_closed_port(pod: Pod, dst: str, port: int, count: int) -> None:
    # Unconnected: a connected socket would fail on the ICMP port-unreachable replies.
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(int(sys.argv[3])):\n"
        "    s.sendto(b'x' * 100, (sys.argv[1], int(sys.argv[2]))); time.sleep(0.0002)\n"
    )
    pod.exec([sys.executable, "-c", code, dst, str(port), str(count)], timeout=120)


def _connect_closed_port(pod: Pod, dst: str, port: int, count: int) -> None:
    code = (
        "import socket, sys\n"
        "for _ in range(int(sys.argv[3])):\n"
        "    s = socket.socket(); r = s.connect_ex((sys.argv[1], int(sys.argv[2]))); s.close()\n"
        "    assert r != 0\n"
    )
    pod.exec([sys.executable, "-c", code, dst, str(port), str(count)], timeout=120)


def _traffic(bed: Testbed, a: Pod, b: Pod) -> list[str]:
    """The fixed mix; returns a line per part for the report."""
    done = []
    bed.start_tcp_sink(b, 5001)
    bed.start_tcp_sink(b, 5002)
    bed.start_udp_sink(b, 6001)
    send_tcp(a, b.ipv4, 5001, 50_000_000, timeout=120)
    done.append("TCP bulk: 50 MB a->b (GSO on)")
    send_udp(a, b.ipv4, 6001, 5000, 200, interval=0.0002)
    done.append("UDP: 5000 x 200 B a->b")
    send_ping(a, b.ipv4, 50, interval=0.01)
    done.append("ICMP: 50 echo requests")
    _connect_many(a, b.ipv4, 5001, 300)
    done.append("TCP: 300 short connections (state changes)")
    _sendto_closed_port(a, b.ipv4, 6999, 2000)
    done.append("drops: 2000 UDP datagrams to a closed port")
    _connect_closed_port(a, b.ipv4, 5999, 200)
    done.append("resets: 200 connects to a closed port (SYN dropped, RST sent and received)")
    a.exec(["ip", "link", "set", "dev", "eth0", "gso_max_segs", "4"])
    b.exec(["nft", "-f", "-"], input=(
        "table inet flowtel_bench {\n chain input {\n  type filter hook input priority 0;\n"
        "  tcp dport 5002 tcp flags & syn == 0 numgen random mod 10 == 0 drop\n }\n}\n"))
    for _ in range(5):
        send_tcp(a, b.ipv4, 5002, 1_000_000, timeout=120)
    done.append("loss: 5 x 1 MB a->b with 10% of segments dropped by nftables (retransmissions)")
    return done


class _TestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (libbpf 1.x)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


def _frames() -> dict[str, bytes]:
    """Ethernet frames of a TCP ACK with 100 payload bytes, a 64-byte UDP datagram, a DNS query
    and a DNS response. Run again and again, the query is a retransmission (its pending insert
    is refused) and the response matches nothing: the steady-state cost of DNS packets, with
    the tail call into flowtel_dns (bpf/dns.h) included in the tc program's time."""
    eth = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"

    def ip(proto: int, payload: bytes) -> bytes:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                          bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        return hdr + payload

    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 1, 5 << 4, 0x10, 65535, 0, 0) + b"x" * 100
    udp = struct.pack("!HHHH", 40000, 6001, 8 + 18, 0) + b"x" * 18
    question = b"\x07example\x03com\x00\x00\x01\x00\x01"
    dns = struct.pack("!HHHH", 40000, 53, 8 + 29, 0) + struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + question
    answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + bytes([192, 0, 2, 1])
    resp = struct.pack("!HHHH", 53, 40000, 8 + 29 + len(answer), 0) + \
        struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0) + question + answer
    return {"TCP 100 B": eth + ip(6, tcp), "UDP 64-byte frame": eth + ip(17, udp), "DNS query": eth + ip(17, dns),
            "DNS response": eth + ip(17, resp)}


def test_run_ns(prog_fd: int, frame: bytes, repeat: int = 200_000) -> float:
    """Mean ns per run of a SCHED_CLS program on ``frame``, measured by the kernel."""
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
    buf = ctypes.create_string_buffer(frame, len(frame))
    out = ctypes.create_string_buffer(len(frame) + 256)
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.cast(buf, ctypes.c_void_p),
                        data_out=ctypes.cast(out, ctypes.c_void_p), data_size_in=len(frame),
                        data_size_out=len(out), repeat=repeat)
    if lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return float(opts.duration)


def main() -> int:
    if os.geteuid() != 0:
        print("run as root: the bench loads eBPF programs and creates network namespaces", file=sys.stderr)
        return 2
    from receiver.ebpf.config import EbpfReceiverConfig
    from receiver.ebpf.receiver import EbpfReceiver

    with open(STATS_SYSCTL) as f:
        old = f.read().strip()
    Testbed.cleanup_stale()
    with open(STATS_SYSCTL, "w") as f:
        f.write("1")
    try:
        with Testbed() as bed:
            a, b = bed.add_pod("bench-a"), bed.add_pod("bench-b")
            telemetry = Telemetry()
            receiver = EbpfReceiver(
                CreateSettings("ebpf", "bench", telemetry),
                EbpfReceiverConfig(interfaces=[bed.interface_glob], collection_interval=1.0),
                _Discard(),
            )
            receiver.start()
            try:
                deadline = time.monotonic() + 10
                attach = receiver.attach_manager
                while attach is not None and len(attach.attached()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                ids = _own_program_ids()
                before = _stats(ids)
                started = time.monotonic()
                parts = _traffic(bed, a, b)
                elapsed = time.monotonic() - started
                after = _stats(ids)
                # Without bpf_stats: its accounting (two clock reads per run) would be most of
                # what the tight loop measures.
                with open(STATS_SYSCTL, "w") as f:
                    f.write("0")
                tight: dict[tuple[str, str], float] = {}
                for hook in ("ingress", "egress"):
                    fn = receiver._bpf.load_func(f"flowtel_tc_{hook}", 3)  # BPF.SCHED_CLS: the loaded program
                    for label, frame in _frames().items():
                        tight[(f"flowtel_tc_{hook}", label)] = test_run_ns(fn.fd, frame)
            finally:
                receiver.shutdown()
    finally:
        with open(STATS_SYSCTL, "w") as f:
            f.write(old)

    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs; traffic ({elapsed:.1f} s):")
    for line in parts:
        print(f"  - {line}")
    print(f"\n{'program':<20} {'type':<12} {'runs':>10} {'total ms':>10} {'ns/run':>8}")
    for pid in sorted(after, key=lambda i: after[i].name):
        p, q = after[pid], before.get(pid)
        runs = p.run_cnt - (q.run_cnt if q else 0)
        ns = p.run_time_ns - (q.run_time_ns if q else 0)
        per = f"{ns / runs:.0f}" if runs else "-"
        print(f"{p.name:<20} {p.type:<12} {runs:>10} {ns / 1e6:>10.1f} {per:>8}")
    print("\ntc programs in a tight loop (BPF_PROG_TEST_RUN, 200k runs, one flow; ns/run):")
    labels = list(_frames())
    print(f"{'program':<20} " + " ".join(f"{lab:>18}" for lab in labels))
    for prog in ("flowtel_tc_ingress", "flowtel_tc_egress"):
        print(f"{prog:<20} " + " ".join(f"{tight[(prog, lab)]:>18.0f}" for lab in labels))
    print(f"\n{STATS_SYSCTL} restored to {old}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
