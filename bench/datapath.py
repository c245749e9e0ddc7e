"""Datapath cost: real clients between network-namespace pods, with no observer, with flowtel
(the shipped config/flowtel.yaml) and with tcpdump on the same veths, in one run.

Workloads (each a real client against a real server in another pod):

- ``tcp``: ``iperf3 -c`` 1 stream, bits/s the receiver got;
- ``udp64``: ``iperf3 -u -b 0 -l 64``, an unpaced flood of 64-byte datagrams, datagrams/s the
  server received (sent − lost: the flood overflows the server's socket, every overflow is a
  kernel drop that flowtel must count);
- ``dns``: ``dnsperf`` (unlimited rate, its defaults otherwise) against ``dnsmasq`` answering
  1 000 names, queries/s completed;
- ``conn``: short TCP connections, one after another (connect, the server accepts and closes,
  the client closes): connections/s completed. A Python client and server: the kernel does
  every handshake and teardown, which is what flowtel's socket tracepoints see.

Observers (conditions):

- ``none``: nothing attached;
- ``flowtel``: ``flowtel run`` with config/flowtel.yaml as shipped, except what must differ on
  a shared machine: its interfaces are this testbed's veths (not every veth on the host), the
  flow log is in a temporary directory, the prometheus and flows endpoints are free loopback
  ports, the fqdnpolicy receiver's pin directory is an empty temporary path;
- ``tcpdump``: ``tcpdump -w /dev/null`` on every host-side veth of the testbed (one process each).

One round runs every workload under each observer in turn; the order of the observers
rotates from round to round so drift on a shared machine hits each alike. Values are medians
of the rounds, quoted as ratios to no observer of the same run. The observer's CPU is read
from /proc/PID/stat (utime + stime of the process and its descendants). flowtel aggregates in
the kernel and drains every collection interval (10 s as shipped), so the work a workload
causes may land after it ends: flowtel's CPU for a workload is measured from its start to
``--tail`` seconds after its end, minus the idle rate over that tail, per second of workload
(marked as a lower bound when the agent was still busy over the tail's last 2 s).
Idle is measured over ``--idle`` seconds (at least one interval) once start-up has settled.

The agent is **cold** on purpose: flowtel starts afresh each round, so the ``dns`` workload's
1 000 names are new to it every round, and their first sight (each name's samples parsed,
each aggregation key's l7 and flow built) lands inside the measured window. A node agent
lives for weeks and meets most names again, so a warm one costs less; the DNS target (agent
CPU ≤ 0.05 cores at full dnsperf rate) is read against this cold figure, the stricter one,
so no one-off cost is hidden. There is no separate warm figure: first sight of the 1 000
names and their 4 000 keys costs the DNS reader ~32 ms a round (name samples ~10 ms with
dnswire's one-pass reader, the first drain ~22 ms) against ~12 ms warm (measured apart,
receiver/ebpf/README.md "Cost"), i.e. ≤ 0.004 cores of a 5 s run, below this bench's noise.

Run with ``make bench`` or ``python -m bench.datapath [--rounds 5] [--seconds 5]`` as root.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import yaml  # type: ignore[import-untyped]

from bench.datapath_table import (FLOWTEL, NONE, OBSERVERS, TCPDUMP, WORKLOADS, Check, DnsperfResult, Sample,
                                  iperf3_tcp_bits_per_second, iperf3_udp_received_per_second, parse_conn_client,
                                  parse_dnsperf, proc_stat_ticks, prometheus_sums, render, render_checks, summarize,
                                  tcpdump_drops)
from bench.startup import Agent, free_port, rss_mb
from testbed import LinkStats, Pod, Testbed, require_tool

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "config" / "flowtel.yaml"
CONN_PORT = 7070  # inside the server pod's own namespace
DNS_NAMES = 1000
ALL_WORKLOADS = tuple(w.key for w in WORKLOADS)
CLK_TCK = os.sysconf("SC_CLK_TCK")

CONN_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4096)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""
CONN_CLIENT = r"""
import json, socket, sys, time
dst, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = errors = 0
t0 = time.monotonic()
end = t0 + seconds
while time.monotonic() < end:
    try:
        s = socket.create_connection((dst, port), timeout=2)
        s.recv(1)  # the server's FIN
        s.close()
        n += 1
    except OSError:
        errors += 1
print(json.dumps({"connections": n, "errors": errors, "seconds": time.monotonic() - t0}))
"""


def cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and every live descendant."""
    ticks: dict[int, int] = {}
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid, t = proc_stat_ticks(f.read())
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks[int(entry)] = t
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / CLK_TCK


def shipped_config(interface_glob: str, workdir: Path, source: Path = SHIPPED_CONFIG) -> tuple[Path, str | None]:
    """config/flowtel.yaml, changed only where a shared machine requires (module docstring);
    returns it and the prometheus exporter's endpoint (None if the shipped config has none)."""
    cfg = yaml.safe_load(source.read_text())
    cfg["receivers"]["ebpf"]["interfaces"] = [interface_glob]
    if "fqdnpolicy" in cfg["receivers"]:
        cfg["receivers"]["fqdnpolicy"]["pin_dir"] = str(workdir / "no-dnsproxy-pins")
    cfg["exporters"]["file"]["path"] = str(workdir / "flows.log")
    prometheus = None
    if "prometheus" in cfg["exporters"]:
        prometheus = cfg["exporters"]["prometheus"]["endpoint"] = f"127.0.0.1:{free_port()}"
    for name, ext in (cfg.get("extensions") or {}).items():
        if isinstance(ext, dict) and "endpoint" in ext:
            ext["endpoint"] = f"127.0.0.1:{free_port()}"
    path = workdir / "flowtel.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, prometheus


class Observer:
    """No observer: the baseline."""

    name = NONE

    def __enter__(self) -> "Observer":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def cpu(self) -> float | None:
        return None

    def settle_cores(self, idle_cores: float) -> tuple[float, bool]:
        """Wait for the work a workload left behind; return the idle share of the CPU over
        that wait and whether the observer was still busy at its end."""
        return 0.0, False


class Flowtel(Observer):
    name = FLOWTEL

    def __init__(self, bed: Testbed, workdir: Path, *, settle: float, idle: float, tail: float) -> None:
        self.bed, self.workdir = bed, workdir
        self.settle, self.idle, self.tail = settle, idle, tail
        self.agent: Agent | None = None
        self.idle_cores = 0.0
        self.rss_samples: list[float] = []
        self.dns_queries_sent = 0
        self.prometheus: str | None = None
        self.links0: dict[str, LinkStats] = {}

    def __enter__(self) -> "Flowtel":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config, self.prometheus = shipped_config(self.bed.interface_glob, self.workdir)
        # The quiet testbed sends nothing by itself: what the veths count from here on is the
        # workloads' traffic, all of which flowtel must see.
        self.links0 = {name: self.bed.link_stats(pod) for name, pod in self.bed.pods.items()}
        self.agent = Agent(config, self.workdir / "agent.log").start()
        try:
            for pod in self.bed.pods.values():
                self.agent.wait_attached(pod)
            self._settle()
            c0, t0 = cpu_seconds(self.agent.pid), time.monotonic()
            time.sleep(self.idle)
            self.idle_cores = (cpu_seconds(self.agent.pid) - c0) / (time.monotonic() - t0)
            self.check()
        except BaseException:
            self.agent.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.agent is not None
        self.agent.stop()

    def _settle(self) -> None:
        """Start-up work (compilation, attach, the first drains) is not idle: wait ``settle``
        seconds, then until the agent used < 0.05 cores over 2 s (on a loaded machine start-up
        runs long), at most 60 s more."""
        assert self.agent is not None
        time.sleep(self.settle)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            c0, t0 = cpu_seconds(self.agent.pid), time.monotonic()
            time.sleep(2.0)
            if (cpu_seconds(self.agent.pid) - c0) / (time.monotonic() - t0) < 0.05:
                return

    def check(self) -> None:
        assert self.agent is not None
        if not self.agent.alive():
            raise RuntimeError(f"flowtel run exited: {self.agent.log.read_text()[-3000:]}")

    def cpu(self) -> float | None:
        assert self.agent is not None
        return cpu_seconds(self.agent.pid)

    def settle_cores(self, idle_cores: float) -> tuple[float, bool]:
        """Wait out the tail (the drain of the workload's interval); return its idle share, and
        whether the agent still used > 0.1 cores over the tail's last 2 s (then the work the
        workload caused outlasted the tail and the figure is a lower bound)."""
        assert self.agent is not None
        time.sleep(max(0.0, self.tail - 2.0))
        c0, t0 = cpu_seconds(self.agent.pid), time.monotonic()
        time.sleep(min(2.0, self.tail))
        busy = (cpu_seconds(self.agent.pid) - c0) / (time.monotonic() - t0) > max(0.1, 5 * idle_cores)
        self.check()
        self.rss_samples.append(rss_mb(self.agent.pid))
        return idle_cores * self.tail, busy


    def counts(self, r: int) -> Check | None:
        """After the last workload: one more interval for the metric pipeline's own interval
        (hubblemetrics, the exporter), then flowtel's counters against the veths' and dnsperf's."""
        if self.prometheus is None:
            return None
        time.sleep(self.tail)
        self.check()
        with urllib.request.urlopen(f"http://{self.prometheus}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        # Which map, ring or queue lost events: Hubble's family folds every kernel source into one.
        for line in text.splitlines():
            if line.startswith("flowtel_lost_events_total{"):
                print(f"round {r}: {line}", file=sys.stderr, flush=True)
        got = prometheus_sums(text, ["networkobservability_forward_count", "networkobservability_dns_request_count",
                                     "hubble_lost_events_total"])
        fwd = {d: prometheus_sums("\n".join(line for line in text.splitlines() if f'direction="{d}"' in line),
                                  ["networkobservability_forward_count"]).get("networkobservability_forward_count", 0.0)
               for d in ("ingress", "egress")}
        delta = [self.bed.link_stats(pod) - self.links0[name] for name, pod in self.bed.pods.items()]
        return Check(r, fwd["ingress"], sum(d.rx_packets for d in delta), fwd["egress"], sum(d.tx_packets for d in delta),
                     got.get("networkobservability_dns_request_count", 0.0), self.dns_queries_sent,
                     got.get("hubble_lost_events_total", 0.0))


class Tcpdump(Observer):
    name = TCPDUMP

    def __init__(self, pods: list[Pod]) -> None:
        self.pods = pods
        self.procs: list[subprocess.Popen[str]] = []
        self.summaries: list[tuple[int, int]] = []

    def __enter__(self) -> "Tcpdump":
        tcpdump = require_tool("tcpdump")
        try:
            for pod in self.pods:
                p = subprocess.Popen([tcpdump, "-n", "-i", pod.host_ifname, "-w", "/dev/null"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
                self.procs.append(p)
                assert p.stderr is not None
                line = p.stderr.readline()  # "listening on …": the capture is live
                if "listening" not in line:
                    raise RuntimeError(f"tcpdump on {pod.host_ifname} did not start: {line}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                _, err = p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            if (s := tcpdump_drops(err or "")) is not None:
                self.summaries.append(s)
        self.procs = []

    def cpu(self) -> float | None:
        return sum(cpu_seconds(p.pid) for p in self.procs)


class Bed:
    """The pods and servers every workload uses."""

    def __init__(self, bed: Testbed, workdir: Path) -> None:
        self.bed = bed
        self.client = bed.add_pod("client")
        self.server = bed.add_pod("server")
        self.dns = bed.add_pod("dns")
        self.server.popen([require_tool("iperf3"), "-s", "-B", self.server.ipv4],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        conn = self.server.popen([sys.executable, "-c", CONN_SERVER, self.server.ipv4, str(CONN_PORT)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert conn.stdout is not None
        if conn.stdout.readline().strip() != "listening":
            raise RuntimeError("the connection-rate server did not start")
        names = [f"svc{i}.ns{i % 20}.bench.local" for i in range(DNS_NAMES)]
        bed.start_dnsmasq(self.dns, hosts={n: [f"198.51.{100 + i // 250}.{i % 250 + 1}"] for i, n in enumerate(names)})
        self.queries = workdir / "dnsperf-queries.txt"
        self.queries.write_text("".join(f"{n} A\n" for n in names))
        # Many short connections: the client's ephemeral ports must not run out (per netns).
        self.client.exec(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])
        self.last_dnsperf: DnsperfResult | None = None
        time.sleep(0.5)  # iperf3 -s binds asynchronously

    def iperf3(self, args: list[str], seconds: float) -> dict:
        for attempt in range(3):
            res = self.client.exec([require_tool("iperf3"), "-c", self.server.ipv4, "-J", "-t", str(seconds), *args],
                                   check=False, timeout=seconds + 60)
            try:
                out = json.loads(res.stdout)
            except json.JSONDecodeError:
                raise RuntimeError(f"iperf3 printed no JSON: {res.stdout[-500:]} {res.stderr[-500:]}")
            if "busy" in str(out.get("error", "")) and attempt < 2:
                time.sleep(2)  # the server still finishing the previous test
                continue
            return out
        raise AssertionError("unreachable")

    def run(self, workload: str, seconds: float) -> float:
        if workload == "tcp":
            return iperf3_tcp_bits_per_second(self.iperf3([], seconds))
        if workload == "udp64":
            return iperf3_udp_received_per_second(self.iperf3(["-u", "-b", "0", "-l", "64"], seconds))
        if workload == "dns":
            res = self.client.exec([require_tool("dnsperf"), "-s", self.dns.ipv4, "-d", str(self.queries),
                                    "-l", str(seconds)], timeout=seconds + 60)
            self.last_dnsperf = parse_dnsperf(res.stdout)
            return self.last_dnsperf.qps
        if workload == "conn":
            res = self.client.exec([sys.executable, "-c", CONN_CLIENT, self.server.ipv4, str(CONN_PORT), str(seconds)],
                                   timeout=seconds + 60)
            return parse_conn_client(res.stdout)
        raise ValueError(f"unknown workload {workload!r}")


def _rotated(r: int) -> tuple[str, ...]:
    k = r % len(OBSERVERS)
    return OBSERVERS[k:] + OBSERVERS[:k]


class Run:
    """Everything one run measured."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.idle_cores: list[float] = []
        self.rss_mb: list[float] = []
        self.tcpdump_drops: list[tuple[int, int]] = []
        self.loadavg: list[float] = []
        self.checks: list[Check] = []


def run(rounds: int = 5, seconds: float = 5.0, *, settle: float = 8.0, idle: float = 10.5, tail: float = 11.0,
        workloads: tuple[str, ...] = ALL_WORKLOADS,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> Run:
    out = Run()
    Testbed.cleanup_stale()
    with Testbed() as testbed, tempfile.TemporaryDirectory(prefix="flowtel-bench-datapath-") as tmp:
        bed = Bed(testbed, Path(tmp))

        def observer(name: str, r: int) -> Observer:
            if name == FLOWTEL:
                return Flowtel(testbed, Path(tmp) / f"agent{r}", settle=settle, idle=idle, tail=tail)
            if name == TCPDUMP:
                return Tcpdump(list(testbed.pods.values()))
            return Observer()

        for r in range(rounds):
            for name in _rotated(r):
                out.loadavg.append(os.getloadavg()[0])
                with observer(name, r) as obs:
                    idle_cores = obs.idle_cores if isinstance(obs, Flowtel) else 0.0
                    if isinstance(obs, Flowtel):
                        out.idle_cores.append(idle_cores)
                    for w in workloads:
                        c0, t0 = obs.cpu(), time.monotonic()
                        value = bed.run(w, seconds)
                        wall = time.monotonic() - t0
                        idle_share, busy = obs.settle_cores(idle_cores)
                        c1 = obs.cpu()
                        cores = None if c0 is None or c1 is None else max(0.0, c1 - c0 - idle_share) / wall
                        out.samples.append(Sample(w, name, r, value, cores, busy_after_tail=busy))
                        if isinstance(obs, Flowtel) and w == "dns" and bed.last_dnsperf is not None:
                            obs.dns_queries_sent += bed.last_dnsperf.sent
                        log(f"round {r + 1}/{rounds} {name:8} {w:6} {value:14,.0f}"
                            + ("" if cores is None else f"  observer {cores:.3f} cores")
                            + ("  (still busy after the tail)" if busy else ""))
                        time.sleep(1.0)  # sockets of the last workload close before the next
                    if isinstance(obs, Flowtel) and (check := obs.counts(r)) is not None:
                        out.checks.append(check)
                if isinstance(obs, Flowtel):
                    out.rss_mb.extend(obs.rss_samples)
                    log(f"round {r + 1}/{rounds} flowtel idle {idle_cores:.4f} cores, RSS {max(obs.rss_samples, default=0):.0f} MB")
                if isinstance(obs, Tcpdump):
                    out.tcpdump_drops.extend(obs.summaries)
    return out


def report(res: Run) -> str:
    import statistics

    text = render(summarize(res.samples),
                  idle_cores=statistics.median(res.idle_cores) if res.idle_cores else None,
                  rss_mb=max(res.rss_mb) if res.rss_mb else None)
    if res.tcpdump_drops:
        rec = sum(r for r, _ in res.tcpdump_drops)
        drop = sum(d for _, d in res.tcpdump_drops)
        text += f"\ntcpdump: {drop:,} of {rec:,} packets dropped by the kernel before capture ({drop / max(rec, 1):.1%})."
    if res.checks:
        text += ("\n\nWhat flowtel counted (its prometheus endpoint, after the workloads) against the kernel's "
                 "counters of the same veths and dnsperf's own count (each query crosses two observed veths and is "
                 "counted once, at the client's: 1.0000 is exact):\n\n"
                 + render_checks(res.checks) + "\n")
    if res.loadavg:
        text += f"\nload average (1 min) at the start of each condition: {min(res.loadavg):.2f}–{max(res.loadavg):.2f}."
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each workload run")
    parser.add_argument("--tail", type=float, default=11.0,
                        help="seconds after each workload charged to it (≥ the collection interval)")
    parser.add_argument("--idle", type=float, default=10.5, help="seconds of idle measured (≥ the collection interval)")
    parser.add_argument("--workloads", default=",".join(ALL_WORKLOADS))
    parser.add_argument("--samples", type=Path, help="also write every sample and check as JSON here")
    args = parser.parse_args(argv)
    res = run(args.rounds, args.seconds, idle=args.idle, tail=args.tail, workloads=tuple(args.workloads.split(",")))
    print(report(res), flush=True)
    if args.samples is not None:
        args.samples.write_text(json.dumps({
            "samples": [dataclasses.asdict(s) for s in res.samples], "checks": [dataclasses.asdict(c) for c in res.checks],
            "idle_cores": res.idle_cores, "rss_mb": res.rss_mb, "tcpdump_drops": res.tcpdump_drops,
            "loadavg": res.loadavg}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
