"""Kernel time per run of each flowtel eBPF program, under known traffic through pods.

Not a test: run as root, ``.venv/bin/python -m bench.bpf_runtime [--json PATH]``. It turns on
the kernel's run-time accounting of BPF programs (``BPF_ENABLE_STATS``: reference-counted, so
benches of other people on the machine neither end it nor are ended by it; the kernel then
accounts run count and run time per program), attaches flowtel's programs as the agent does
(the ``ebpf`` receiver: its tc program on the testbed's veths and the kernel-events
tracepoints, one bcc module, with a logs and a metrics consumer as in the shipped config, so
every event path is compiled in), sends a fixed mix of traffic between pods and prints
``run_time_ns / run_cnt`` per program from ``bpftool -j prog show``, in total and for each
part of the mix (bulk TCP, small UDP datagrams of one flow, ICMP, short connections, drops,
resets, loss), so that the cost of a packet of a known flow is not averaged with the first
packets of new flows.

The same mix is first sent through tc programs that only return, attached where flowtel's
go: their ns/run is the floor on this machine at this moment (the hook, the accounting's own
two clock reads, the first touch of the program), against which flowtel's figure is read.

tc programs run once per packet per hook on the testbed's veths only, so their ns/run is the
cost per packet. That figure includes whatever the machine's load does to caches and the
hypervisor's steal; so the tc programs are also run by the kernel itself in a tight loop on
fixed packets (``BPF_PROG_TEST_RUN``, the same flow each time: the steady-state cost of a
packet of a known flow), with the accounting off again (its two clock reads per run would
otherwise be a large part of what is measured). Tracepoints are global: they also run for
whatever else this machine does meanwhile (and ``skb:kfree_skb`` only for drops), so their
run counts include that.

``--floods`` measures instead what a node pays under the load the ≤ 150 ns target is about:
the datapath bench's real clients (``bench.datapath.Bed``: ``iperf3`` TCP 1 stream,
``iperf3 -u -b 0 -l 64``, ``dnsperf`` against ``dnsmasq``) between its pods, with the
accounting on, each flood once through empty tc programs on the same veths and once through
flowtel's, in an order that alternates from round to round; medians of the rounds. flowtel_dns
is reached by a tail call, whose time the kernel accounts to the caller: flowtel_tc's figure
under dnsperf is the whole DNS path.

**The figure the ≤ 150 ns target is read against: flowtel_tc's ns/run under a flood minus the
empty program's ns/run under the same flood** (the "flowtel_tc - empty" column). Under a flood,
not in the tight loop: the tight loop runs one packet whose every line is in the cache, while
under a flood the stack's own copies evict the program's maps between packets, and those
misses are most of what a node pays (tight loop 60-65 ns of program time against 90-200 ns
under the floods). Minus the empty program: the accounting itself (two clock reads per run,
70-130 ns on this VM under a flood) and the hook's dispatch are in both figures, and a node
runs with the accounting off; what is left is what flowtel's program adds per packet.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowtel.component import CreateSettings, Telemetry
from flowtel.lib.bpf.testrun import prog_test_run
from flowtel.records import Record
from testbed import Pod, Testbed, require_tool, send_ping, send_tcp, send_udp

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


Part = tuple[str, Callable[[], object]]


CONNECTIONS = 2000  # short connections of the connection-only part
FLOOD_SECONDS = 3
IPERF3_PORT = 5201  # inside b's own namespace


def _udp_flood(a: Pod, b: Pod, seconds: float, refused: list[int]) -> None:
    """``iperf3 -u -b 0 -l 64`` a->b, the datapath bench's UDP flood: b's socket overflows and
    every datagram it refuses is a ``skb:kfree_skb`` drop (SOCKET_RCVBUFF) in b's softirq.
    Appends how many b's sockets refused (UdpRcvbufErrors) to ``refused``."""
    before = udp_rcvbuf_errors(b)
    a.exec([require_tool("iperf3"), "-c", b.ipv4, "-p", str(IPERF3_PORT), "-u", "-b", "0", "-l", "64",
            "-t", str(seconds), "-J"], timeout=seconds + 60)
    refused.append(udp_rcvbuf_errors(b) - before)


def udp_rcvbuf_errors(pod: Pod) -> int:
    """UdpRcvbufErrors of the pod's namespace: the kernel's own count of datagrams its full
    sockets refused."""
    lines = [line.split() for line in pod.exec(["cat", "/proc/net/snmp"]).stdout.splitlines() if line.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))["RcvbufErrors"]


def _traffic(bed: Testbed, a: Pod, b: Pod, refused: list[int]) -> list[Part]:
    """The fixed mix, one part per kind of traffic: the bench reads each program's counters
    between parts, so that the cost of a packet of a known flow (bulk TCP, small UDP) is not
    hidden in an average with the first packets of many short flows (which insert map entries).
    Parts can be sent more than once (the floor run, then flowtel's)."""

    def loss() -> None:
        a.exec(["ip", "link", "set", "dev", "eth0", "gso_max_segs", "4"])
        # Declared, deleted and declared again in one transaction: a second run replaces the rule.
        b.exec(["nft", "-f", "-"], input=(
            "table inet flowtel_bench {}\ndelete table inet flowtel_bench\n"
            "table inet flowtel_bench {\n chain input {\n  type filter hook input priority 0;\n"
            "  tcp dport 5002 tcp flags & syn == 0 numgen random mod 10 == 0 drop\n }\n}\n"))
        for _ in range(5):
            send_tcp(a, b.ipv4, 5002, 1_000_000, timeout=120)
        a.exec(["ip", "link", "set", "dev", "eth0", "gso_max_segs", "65535"])
        b.exec(["nft", "delete", "table", "inet", "flowtel_bench"])

    return [
        ("TCP bulk: 50 MB a->b (GSO on)", lambda: send_tcp(a, b.ipv4, 5001, 50_000_000, timeout=120)),
        ("UDP: 5000 x 200 B a->b", lambda: send_udp(a, b.ipv4, 6001, 5000, 200, interval=0.0002)),
        ("UDP 64-byte frames: 20000 x 18 B a->b, one flow",
         lambda: send_udp(a, b.ipv4, 6002, 20000, 18, interval=0.00002, timeout=120)),
        ("ICMP: 50 echo requests", lambda: send_ping(a, b.ipv4, 50, interval=0.01)),
        (f"TCP: {CONNECTIONS} short connections, nothing else (state changes)",
         lambda: _connect_many(a, b.ipv4, 5001, CONNECTIONS)),
        (f"UDP flood: iperf3 -u -b 0 -l 64, {FLOOD_SECONDS} s a->b (drops at b's full socket)",
         lambda: _udp_flood(a, b, FLOOD_SECONDS, refused)),
        ("drops: 2000 UDP datagrams to a closed port", lambda: _sendto_closed_port(a, b.ipv4, 6999, 2000)),
        ("resets: 200 connects to a closed port (SYN dropped, RST sent and received)",
         lambda: _connect_closed_port(a, b.ipv4, 5999, 200)),
        ("loss: 5 x 1 MB a->b with 10% of segments dropped by nftables (retransmissions)", loss),
    ]


_FLOOR_C = """
#include <uapi/linux/pkt_cls.h>
int bench_floor_ingress(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
int bench_floor_egress(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
"""


def _run_parts(parts: list[Part], ids: set[int]) -> list[dict[int, ProgStats]]:
    """Sends each part and reads the programs' counters before the first and after each."""
    snaps = [_stats(ids)]
    for _, send in parts:
        send()
        snaps.append(_stats(ids))
    return snaps


def _prog_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise RuntimeError(f"fd {fd} is not a BPF program")


@contextlib.contextmanager
def _empty_attached(fns: dict[str, Any], pods: list[Pod]) -> Iterator[dict[str, int]]:
    """Programs that do nothing (``fns``, by hook) attached where flowtel's go, on the host
    veths of ``pods``; yields {hook: program id}. Not named ``flowtel_``: the attach manager
    would take their filters for a dead agent's."""
    from pyroute2 import IPRoute

    ids = {hook: _prog_id(fn.fd) for hook, fn in fns.items()}
    with IPRoute() as ipr:
        indexes = [ipr.link_lookup(ifname=p.host_ifname)[0] for p in pods]
        try:
            for index in indexes:
                ipr.tc("add", "clsact", index=index)
                for parent, hook in (("ffff:fff2", "ingress"), ("ffff:fff3", "egress")):
                    ipr.tc("add-filter", "bpf", index=index, fd=fns[hook].fd, name=fns[hook].name,
                           parent=parent, classid=1, direct_action=True)
            yield ids
        finally:
            for index in indexes:
                ipr.tc("del", "clsact", index=index)


def _floor(fns: dict[str, Any], pods: list[Pod], parts: list[Part]) -> tuple[dict[str, int], list[dict[int, ProgStats]]]:
    """The mix through programs that do nothing: what the hook, the accounting's own clock
    reads and a program's first touch of the packet cost, the floor under any tc program's
    ns/run on this machine at this moment. Returns {hook: program id} and the counters per part."""
    with _empty_attached(fns, pods) as ids:
        return ids, _run_parts(parts, set(ids.values()))


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
    return float(prog_test_run(prog_fd, frame, repeat).duration_ns)


def _enable_stats() -> int:
    """Turns on the kernel's run-time accounting of BPF programs while the returned fd is open
    (``BPF_ENABLE_STATS``, reference-counted): unlike writing the sysctl, this neither ends
    another process's measurement nor is ended by one running at the same time."""
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    fd = int(lib.bpf_enable_stats(0))  # BPF_STATS_RUN_TIME
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    return fd


def _sysctl_stats_on() -> bool:
    with open(STATS_SYSCTL) as f:
        return f.read().strip() != "0"


def _delta(after: dict[int, ProgStats], before: dict[int, ProgStats], pid: int) -> tuple[int, int]:
    """Runs and run time of program pid between two reads."""
    p, q = after[pid], before.get(pid)
    return p.run_cnt - (q.run_cnt if q else 0), p.run_time_ns - (q.run_time_ns if q else 0)


FLOOD_WORKLOADS = ("tcp", "udp64", "dns")
FLOOD_LABELS = {"tcp": "iperf3 TCP, 1 stream", "udp64": "iperf3 -u -b 0 -l 64 (flood)",
                "dns": "dnsperf against dnsmasq"}


@dataclass(frozen=True, slots=True)
class FloodSample:
    round: int
    condition: str  # "empty" or "flowtel"
    workload: str
    value: float  # the client's figure: bits/s, datagrams/s received, queries/s
    programs: dict[str, tuple[int, int]]  # program name -> (runs, run time ns) over the workload


def _tc_runs(after: dict[int, ProgStats], before: dict[int, ProgStats]) -> dict[str, tuple[int, int]]:
    """(runs, ns) per tc program name between two reads; the empty programs of both hooks as one.
    flowtel_dns has no runs of its own: it is reached by a tail call, whose time the kernel
    accounts to the caller, so flowtel_tc's figure for DNS packets includes it."""
    out: dict[str, tuple[int, int]] = {}
    for pid in after:
        if after[pid].type != "sched_cls":
            continue  # tracepoints run for the whole machine: bench.bpf_runtime's mix reports them
        runs, ns = _delta(after, before, pid)
        name = "(empty)" if after[pid].name.startswith("bench_floor") else after[pid].name
        r0, n0 = out.get(name, (0, 0))
        out[name] = (r0 + runs, n0 + ns)
    return out


def floods(rounds: int, seconds: float, workloads: tuple[str, ...] = FLOOD_WORKLOADS,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
           dns: dict[str, Any] | None = None) -> list[FloodSample]:
    """The datapath bench's real clients (``bench.datapath.Bed``: iperf3, dnsperf against
    dnsmasq) between its pods, with bpf_stats on, through empty tc programs and through
    flowtel's in alternating order: ns/run of each program per flood, next to the floor.
    ``dns``: settings of the receiver's ``dns`` section (e.g. table sizes), defaults otherwise."""
    from bcc import BPF  # type: ignore[import-untyped]  # Debian's python3-bpfcc, no stubs

    from bench.datapath import Bed
    from receiver.ebpf.config import EbpfReceiverConfig
    from receiver.ebpf.receiver import EbpfReceiver

    out: list[FloodSample] = []
    Testbed.cleanup_stale()
    stats_fd = _enable_stats()
    try:
        with Testbed() as testbed, tempfile.TemporaryDirectory(prefix="flowtel-bench-bpf-") as tmp:
            bed = Bed(testbed, Path(tmp))
            pods = list(testbed.pods.values())
            floor_mod = BPF(text=_FLOOR_C)
            try:
                floor_fns = {h: floor_mod.load_func(f"bench_floor_{h}", BPF.SCHED_CLS) for h in ("ingress", "egress")}

                def measure(r: int, condition: str, ids: set[int]) -> None:
                    for w in workloads:
                        before = _stats(ids)
                        value = bed.run(w, seconds)
                        programs = _tc_runs(_stats(ids), before)
                        out.append(FloodSample(r, condition, w, value, programs))
                        log(f"round {r + 1}/{rounds} {condition:8} {w:6} {value:14,.0f}  " + ", ".join(
                            f"{n} {ns / runs:.0f} ns/run ({runs:,} runs)" for n, (runs, ns) in programs.items() if runs))
                        time.sleep(1.0)  # the last workload's sockets close before the next

                for r in range(rounds):
                    for condition in (("empty", "flowtel") if r % 2 == 0 else ("flowtel", "empty")):
                        if condition == "empty":
                            with _empty_attached(floor_fns, pods) as floor_ids:
                                measure(r, condition, set(floor_ids.values()))
                            continue
                        floor_prog_ids = {_prog_id(fn.fd) for fn in floor_fns.values()}
                        receiver = EbpfReceiver(
                            CreateSettings("ebpf", "bench", Telemetry()),
                            EbpfReceiverConfig.model_validate({"interfaces": [testbed.interface_glob],
                                                               "collection_interval": 10.0, "dns": dns or {}}),
                            _Discard(),
                        )
                        receiver.start()
                        try:
                            deadline = time.monotonic() + 20
                            attach = receiver.attach_manager
                            while attach is not None and len(attach.attached()) < len(pods) and time.monotonic() < deadline:
                                time.sleep(0.05)
                            if attach is None or len(attach.attached()) < len(pods):
                                raise RuntimeError("flowtel's tc programs were not attached to every pod's veth within 20 s")
                            measure(r, condition, _own_program_ids() - floor_prog_ids)
                        finally:
                            receiver.shutdown()
            finally:
                floor_mod.cleanup()
    finally:
        os.close(stats_fd)
    return out


def flood_report(samples: list[FloodSample]) -> str:
    """Medians over rounds: ns/run of each program, the floor, and flowtel's minus the floor."""
    import statistics

    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    def fmt(v: float | None, spec: str = ".0f") -> str:
        return "-" if v is None else format(v, spec)

    names = sorted({n for s in samples if s.condition == "flowtel" for n in s.programs})
    lines = [f"{'flood':<32} {'tc runs (flowtel)':>17} {'(empty) ns/run':>14} "
             + " ".join(f"{n + ' ns/run':>20}" for n in names) + f" {'flowtel_tc - empty':>18} {'client, flowtel/empty':>22}"]
    for w in dict.fromkeys(s.workload for s in samples):
        empty = [s for s in samples if s.workload == w and s.condition == "empty"]
        ours = [s for s in samples if s.workload == w and s.condition == "flowtel"]

        def per_run(group: list[FloodSample], name: str) -> list[float]:
            return [s.programs[name][1] / s.programs[name][0] for s in group
                    if name in s.programs and s.programs[name][0]]

        floor = med(per_run(empty, "(empty)"))
        cols = {n: med(per_run(ours, n)) for n in names}
        tc = cols.get("flowtel_tc")
        rate = med([s.programs.get("flowtel_tc", (0, 0))[0] / 1.0 for s in ours])
        ratio = med([o.value / e.value for o, e in zip(ours, empty) if e.value])
        lines.append(f"{FLOOD_LABELS.get(w, w):<32} {fmt(rate, ',.0f'):>17} {fmt(floor):>14} "
                     + " ".join(f"{fmt(cols[n]):>20}" for n in names)
                     + f" {fmt(None if tc is None or floor is None else tc - floor):>18} {fmt(ratio, '.3f'):>22}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bpf_runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the figures (ns/run) to PATH as JSON")
    parser.add_argument("--floods", action="store_true",
                        help="instead of the mix: real floods (iperf3 TCP, UDP 64 B, dnsperf), empty vs flowtel")
    parser.add_argument("--tight", action="store_true", help="only the tight loop (no traffic mix)")
    parser.add_argument("--rounds", type=int, default=3, help="with --floods: alternating rounds")
    parser.add_argument("--seconds", type=float, default=5.0, help="with --floods: length of each flood")
    parser.add_argument("--workloads", default=",".join(FLOOD_WORKLOADS), help="with --floods")
    parser.add_argument("--dns", action="append", default=[], metavar="KEY=VALUE",
                        help="with --floods: a setting of the receiver's dns section (repeatable), e.g. max_pending=4096")
    parser.add_argument("--max-connections", type=int, default=None, metavar="N",
                        help="kernel_events tcp.max_connections (default: the shipped default), to show "
                             "what the table's size does to flowtel_state")
    args = parser.parse_args(argv)
    json_path = args.json
    if os.geteuid() != 0:
        print("run as root: the bench loads eBPF programs and creates network namespaces", file=sys.stderr)
        return 2
    if args.floods:
        dns_settings = {k: int(v) if v.isdigit() else v for k, v in (a.split("=", 1) for a in args.dns)}
        samples = floods(args.rounds, args.seconds, tuple(args.workloads.split(",")), dns=dns_settings)
        print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
              f"{args.rounds} rounds of {args.seconds:g} s floods, medians; bpf_stats on"
              + (f"; dns {dns_settings}" if dns_settings else "") + ":")
        print(flood_report(samples))
        if json_path:
            with open(json_path, "w") as f:
                json.dump([{"round": s.round, "condition": s.condition, "workload": s.workload, "value": s.value,
                            "programs": s.programs} for s in samples], f)
        return 0
    from receiver.ebpf.config import EbpfReceiverConfig
    from receiver.ebpf.receiver import EbpfReceiver

    Testbed.cleanup_stale()
    stats_fd = _enable_stats()
    try:
        with Testbed() as bed:
            a, b = bed.add_pod("bench-a"), bed.add_pod("bench-b")
            bed.start_tcp_sink(b, 5001)
            bed.start_tcp_sink(b, 5002)
            bed.start_udp_sink(b, 6001)
            bed.start_udp_sink(b, 6002)
            b.popen([require_tool("iperf3"), "-s", "-B", b.ipv4, "-p", str(IPERF3_PORT)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # iperf3 -s binds asynchronously
            refused: list[int] = []
            parts = [] if args.tight else _traffic(bed, a, b, refused)
            labels = [label for label, _ in parts]
            from bcc import BPF  # type: ignore[import-untyped]  # Debian's python3-bpfcc, no stubs
            floor_mod = BPF(text=_FLOOR_C)
            floor_fns = {hook: floor_mod.load_func(f"bench_floor_{hook}", BPF.SCHED_CLS) for hook in ("ingress", "egress")}
            floor_ids, floor_snaps = _floor(floor_fns, [a, b], parts)
            telemetry = Telemetry()
            receiver = EbpfReceiver(
                CreateSettings("ebpf", "bench", telemetry),
                EbpfReceiverConfig(interfaces=[bed.interface_glob], collection_interval=1.0,
                                   **({"kernel_events": {"tcp": {"max_connections": args.max_connections}}}
                                      if args.max_connections else {})),
                _Discard(),
            )
            receiver.start()
            try:
                deadline = time.monotonic() + 10
                attach = receiver.attach_manager
                while attach is not None and len(attach.attached()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                if attach is None or len(attach.attached()) < 2:
                    raise RuntimeError("flowtel's tc programs were not attached to both pods' veths within 10 s")
                ids = _own_program_ids() - set(floor_ids.values())
                started = time.monotonic()
                snaps = _run_parts(parts, ids)
                elapsed = time.monotonic() - started
                # Without bpf_stats: its accounting (two clock reads per run) would be most of
                # what the tight loop measures.
                os.close(stats_fd)
                stats_fd = -1
                others = _sysctl_stats_on()
                tight: dict[tuple[str, str], float] = {}
                assert attach is not None
                # One program for both hooks, or one per hook (older builds): measure each once.
                programs = list(dict.fromkeys(p.name for p in (attach.ingress, attach.egress)))
                fds = {prog: receiver._bpf.load_func(prog, BPF.SCHED_CLS).fd for prog in programs}  # bcc returns the loaded program
                fds["(empty)"] = floor_fns["ingress"].fd
                for prog, fd in fds.items():
                    for label, frame in _frames().items():
                        tight[(prog, label)] = test_run_ns(fd, frame)
            finally:
                receiver.shutdown()
                floor_mod.cleanup()
    finally:
        if stats_fd >= 0:
            os.close(stats_fd)

    before, after = snaps[0], snaps[-1]
    total: dict[str, float | None] = {}
    by_part: dict[str, dict[str, float | None]] = {}
    by_frame: dict[str, dict[str, float]] = {}
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs; traffic ({elapsed:.1f} s), each part sent twice "
          "(through empty tc programs, then through flowtel's):")
    for line in labels:
        print(f"  - {line}")
    print(f"\n{'program':<20} {'type':<12} {'runs':>10} {'total ms':>10} {'ns/run':>8}")
    for pid in sorted(after, key=lambda i: after[i].name):
        runs, ns = _delta(after, before, pid)
        print(f"{after[pid].name:<20} {after[pid].type:<12} {runs:>10} {ns / 1e6:>10.1f} "
              f"{(f'{ns / runs:.0f}' if runs else '-'):>8}")
        total[after[pid].name] = ns / runs if runs else None
    for hook, pid in floor_ids.items():
        runs, ns = _delta(floor_snaps[-1], floor_snaps[0], pid)
        total[f"floor_{hook}"] = ns / runs if runs else None
        print(f"{'(empty, ' + hook + ')':<20} {'sched_cls':<12} {runs:>10} {ns / 1e6:>10.1f} "
              f"{(f'{ns / runs:.0f}' if runs else '-'):>8}")
    tc = {pid: after[pid].name for pid in after if after[pid].type == "sched_cls"}
    # Columns: each empty program, each flowtel tc program, and the mean over every tc run of
    # each kind (comparable whether flowtel has one program for both hooks or one per hook).
    cols = [f"empty {h}" for h in floor_ids] + ["empty, all"] + [tc[pid] for pid in sorted(tc, key=lambda i: tc[i])] + ["flowtel, all"]
    print("\ntc ns/run by part of the mix (bpf_stats on; empty = a program that only returns, on the same veths):")
    print(f"{'part':<50} {'packets':>7} " + " ".join(f"{c:>18}" for c in cols))
    for i, label in enumerate(labels):
        empty = [_delta(floor_snaps[i + 1], floor_snaps[i], pid) for pid in floor_ids.values()]
        ours = [_delta(snaps[i + 1], snaps[i], pid) for pid in sorted(tc, key=lambda i: tc[i])]
        figures = empty + [(sum(r for r, _ in empty), sum(n for _, n in empty))] + \
            ours + [(sum(r for r, _ in ours), sum(n for _, n in ours))]
        row = {c: (ns / runs if runs else None) for c, (runs, ns) in zip(cols, figures)}
        by_part[label] = row
        packets = sum(r for r, _ in ours) // 2  # each packet crosses one ingress and one egress hook
        print(f"{label[:50]:<50} {packets:>7} " + " ".join(
            f"{(f'{v:.0f}' if v is not None else '-'):>18}" for v in row.values()))
    # Tracepoints run for every socket and drop of the machine, not only the testbed's: their
    # runs per part are printed beside ns/run so that a reader sees what else ran (a short
    # connection is ~10 state changes, 5 per end; each datagram b refuses is one drop).
    tps = {pid: after[pid].name for pid in after if after[pid].type == "tracepoint"}
    tp_names = [tps[pid] for pid in sorted(tps, key=lambda i: tps[i])]
    print("\ntracepoint programs by part of the mix (bpf_stats on; runs machine-wide, nothing subtracted; "
          "runs / ns per run):")
    print(f"{'part':<50} " + " ".join(f"{n:>22}" for n in tp_names))
    by_tp: dict[str, dict[str, dict[str, float | None]]] = {}
    for i, label in enumerate(labels):
        cells = []
        for pid in sorted(tps, key=lambda i: tps[i]):
            runs, ns = _delta(snaps[i + 1], snaps[i], pid)
            by_tp.setdefault(label, {})[tps[pid]] = {"runs": runs, "ns_per_run": ns / runs if runs else None}
            cells.append(f"{runs} / {(f'{ns / runs:.0f}' if runs else '-')}")
        print(f"{label[:50]:<50} " + " ".join(f"{c:>22}" for c in cells))
    conn_label = next((lab for lab in labels if "short connections" in lab), "")  # none with --tight
    state_runs = by_tp.get(conn_label, {}).get("flowtel_state", {}).get("runs")
    if state_runs:
        print(f"  {conn_label[:40]}: flowtel_state ran {state_runs / CONNECTIONS:.1f} times per connection")
    if refused:
        flood_label = next(lab for lab in labels if "UDP flood" in lab)
        drop_runs = by_tp.get(flood_label, {}).get("flowtel_drop", {}).get("runs")
        print(f"  UDP flood through flowtel: b refused {refused[-1]} datagrams (UdpRcvbufErrors), "
              f"flowtel_drop ran {drop_runs} times")
    print("\ntc programs in a tight loop (BPF_PROG_TEST_RUN, 200k runs, one flow; ns/run; "
          "(empty): a program that only returns, the loop's own cost):")
    frames = list(_frames())
    print(f"{'program':<20} " + " ".join(f"{lab:>18}" for lab in frames))
    for prog in fds:
        print(f"{prog:<20} " + " ".join(f"{tight[(prog, lab)]:>18.0f}" for lab in frames))
        for lab in frames:
            by_frame.setdefault(lab, {})[prog] = tight[(prog, lab)]
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"total": total, "parts": by_part, "tight": by_frame, "tracepoints": by_tp,
                       "udp_flood_refused": refused[-1:]}, f)
    if others:
        print(f"(the tight loop ran with bpf_stats on all the same: {STATS_SYSCTL} is 1, someone else's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
