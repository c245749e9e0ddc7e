"""Memory: resident memory of a real ``flowtel run``, idle and under sustained load.

Each case starts a fresh agent (its own process, as a DaemonSet would), waits until it is
attached and has drained a few intervals, then samples its VmRSS every 0.5 s:

- ``shipped config``: config/flowtel.yaml itself (ebpf with DNS and kernel events, procfs,
  fqdnpolicy, hubblemetrics, file and prometheus exporters, hubble extension), only pointed at
  the testbed's veths, a temporary flow log and free ports;
- ``shipped config + k8sattributes, N pods from the API``: the same with the k8sattributes
  processor (kubeConfig) on both pipelines' flows, watching the stand-in API server
  (tests/kubeapi, in its own process) that holds N pods with their namespaces, nodes,
  ReplicaSets and services (bench/k8sattributes.py's cluster): the issue's "10k pods cached";

- ``idle``: no traffic at all for ``--seconds``;
- ``idle + k8sattributes static N pods``: the same with the k8sattributes processor naming
  flows from a static file of N pods (there is no API server here; the informer caches'
  own cost per pod at 1k/10k/50k pods is measured by bench/k8sattributes.py, which this
  bench does not duplicate);
- ``sustained load``: a paced UDP sender cycling over ``--flows`` destination ports (so
  that many distinct flows per 10 s interval) plus DNS queries to a dnsmasq pod at about
  200/s, for ``--seconds``; the maximum and the final RSS are reported.

- ``shipped config during <workload>`` (``--workloads conn,udp64``): bench/datapath.py's
  workloads with their real clients, each against a fresh agent with the shipped config: RSS
  before the workload, its peak from the workload's start to ``--tail`` seconds after its end
  (the drains of the intervals it filled), and at the end of that tail. ``conn`` makes the
  most distinct flows per interval (every connection is new flows on two veths and both
  hooks): the case that sizes what one interval's drain holds in flight. With
  ``--agent-tree DIR`` the same cases run alternately against another checkout's agent
  (``DIR/.venv``), for a before/after in one session.

Baseline, same run: a fresh interpreter that has imported bcc and compiled and loaded one
trivial program (DESIGN.md: ≈ 150 MB, LLVM/clang in process), i.e. the floor of any
bcc-based Python agent. Ratios are against it; the issue's target is ≤ 200 MB resident
with 10k pods cached.

Then the cost of each part, in fresh interpreters that add one part at a time (``parts``):
the interpreter, flowtel's core, bcc, the shipped config's components, the agent's one
compiled module before and after the receiver gives the compiler's memory back, and the
Kubernetes client. The 10k-pod cache is the difference between the two shipped cases.

Run with ``make bench`` or ``python -m bench.memory [--seconds 20] [--flows 10000]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.datapath import cpu_seconds
from bench.startup import BASELINE_CODE, UDP_PORT, Agent, agent_config, free_port, rss_mb, start_sender
from testbed import Pod, Testbed

ROOT = Path(__file__).resolve().parents[1]

TARGET_MB = 200.0
IDLE_CPU_SETTLE_S = 12.0  # after attach: one 10 s collection interval and the start's one-time work
DNS_FLOOD_CODE = r"""
import socket, struct, sys, time
dst, rate = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
i = 0
nxt = time.monotonic()
while True:
    name = b"".join(bytes([len(p)]) + p for p in (b"q%d" % (i % 5000), b"bench", b"local")) + b"\0"
    try:
        s.sendto(struct.pack("!HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1", (dst, 53))
    except OSError:
        pass
    try:
        while True:
            s.recv(4096)
    except OSError:
        pass
    i += 1
    nxt += 1 / rate
    d = nxt - time.monotonic()
    if d > 0:
        time.sleep(d)
"""


@dataclass
class Case:
    name: str
    samples: list[float]
    cores: float | None = None  # the agent's CPU in the steady part of the window (shipped idle cases)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def peak(self) -> float:
        return max(self.samples)


def baseline_mb() -> float:
    code = BASELINE_CODE + "import sys\nprint(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
    res = subprocess.run(["/usr/bin/python3", "-c", code], check=True, capture_output=True, text=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def _static_pods(path: Path, n: int) -> None:
    lines = ["pods:"]
    for i in range(n):
        d = i // 5
        lines.append(f"  - {{name: app{d}-5d8f7c-{i:05d}, namespace: ns-{d % 50}, ips: [10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}], "
                     f"labels: {{app: app{d}, pod-template-hash: 5d8f7c, version: v1}}, "
                     f"workloads: [{{kind: Deployment, name: app{d}}}, {{kind: ReplicaSet, name: app{d}-5d8f7c}}], "
                     f"node: node-{i // 100}}}")
    lines.append("namespaces:")
    lines.extend(f"  - {{name: ns-{n}, labels: {{team: t{n % 7}}}}}" for n in range(50))
    path.write_text("\n".join(lines) + "\n")


def shipped_config(bed: Testbed, workdir: Path, kubeconfig: str | None = None) -> Path:
    """config/flowtel.yaml as shipped, pointed at the testbed and free ports; with a kubeconfig,
    plus k8sattributes on the logs pipeline."""
    cfg = yaml.safe_load((ROOT / "config" / "flowtel.yaml").read_text())
    cfg["receivers"]["ebpf"]["interfaces"] = [bed.interface_glob]
    cfg["receivers"]["fqdnpolicy"]["pin_dir"] = str(workdir / "no-proxy-here")  # waits for the maps
    cfg["exporters"]["file"]["path"] = str(workdir / "flows.log")
    cfg["exporters"]["prometheus"]["endpoint"] = f"127.0.0.1:{free_port()}"
    for name in cfg.get("service", {}).get("extensions", []):  # hubble (and health_check where configured)
        ext = cfg["extensions"].setdefault(name, {}) or {}
        cfg["extensions"][name] = ext
        if "endpoint" in ext:
            ext["endpoint"] = f"127.0.0.1:{free_port()}"
    if kubeconfig:
        cfg.setdefault("processors", {})["k8sattributes"] = {"auth_type": "kubeConfig", "kubeconfig": kubeconfig}
        cfg["service"]["pipelines"]["logs"]["processors"] = ["k8sattributes"]
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# One part more per step; each step's RSS is measured in a fresh interpreter (this one's Python,
# as the DaemonSet runs it), after gc (and malloc_trim, except for the step that shows what the
# compile leaves before the receiver gives it back).
_PARTS_CODE = r"""
import ctypes, gc, importlib, sys
def rss(trim=True):
    gc.collect()
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
step = int(sys.argv[1])
if step >= 1:
    import flowtel.cli, flowtel.config, flowtel.pipeline
if step >= 2:
    import bcc
if step >= 3:
    from flowtel.component import Kind
    from flowtel.registry import factories_by_kind
    f = factories_by_kind()
    for kind, ctype in [(Kind.RECEIVER, "ebpf"), (Kind.RECEIVER, "procfs"), (Kind.RECEIVER, "fqdnpolicy"),
                        (Kind.CONNECTOR, "hubblemetrics"), (Kind.EXPORTER, "file"), (Kind.EXPORTER, "prometheus"),
                        (Kind.EXTENSION, "hubble")]:
        f[kind][ctype]
    import receiver.ebpf.receiver, receiver.fqdnpolicy.receiver, receiver.procfs.receiver
    import exporters.prometheus.exporter, exporters.file.exporter, extensions.hubble.extension
if step >= 4:
    from flowtel.component import CreateSettings, Telemetry
    try:
        from flowtel.lib.bpf import release
    except ImportError:  # a tree before the release (the "before" of a comparison)
        release = None
    from receiver.ebpf.config import EbpfReceiverConfig
    import receiver.ebpf.receiver as ebpf
    ebpf.release_compiler_memory = lambda: None  # step 4 shows the compile's leftovers, step 5 their release
    class Sink:
        def wants(self, s): return True
        def consume(self, b): pass
    r = ebpf.EbpfReceiver(CreateSettings("ebpf", "n", Telemetry()), EbpfReceiverConfig(interfaces=["flowtel-none-*"]), Sink())
    r.start()
    if step == 4:
        print(rss(trim=False))
        raise SystemExit
    if release is not None:
        release.release_compiler_memory()
if step >= 6:
    import processors.k8sattributes.processor, processors.k8sattributes.kube_source, kubernetes
print(rss())
"""
PARTS = ("Python interpreter", "flowtel core (config, pipeline, CLI)", "bcc imported (libbcc, LLVM/clang libraries mapped)",
         "the shipped config's components (their modules)",
         "the agent's one eBPF module compiled and loaded (tc, DNS, kernel events)",
         "... after release_compiler_memory (freed heap, LLVM/clang code pages)",
         "k8sattributes + Kubernetes client (modules only)")


def parts() -> list[tuple[str, float]]:
    """RSS after each cumulative step, MB."""
    out = []
    for step, name in enumerate(PARTS):
        res = subprocess.run([sys.executable, "-c", _PARTS_CODE, str(step)], check=True, capture_output=True,
                             text=True, cwd=ROOT)
        out.append((name, float(res.stdout.strip().splitlines()[-1])))
    return out


def _sample(agent: Agent, seconds: float, cpu: list[tuple[float, float]] | None = None,
            cpu_from: float = 0.0) -> list[float]:
    """RSS every 0.5 s for ``seconds``; with ``cpu``, also (time, CPU seconds) from ``cpu_from`` on."""
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not agent.alive():
            raise RuntimeError(f"flowtel run exited: {agent.log.read_text()[-2000:]}")
        out.append(rss_mb(agent.pid))
        if cpu is not None and time.monotonic() >= cpu_from:
            cpu.append((time.monotonic(), cpu_seconds(agent.pid)))
        time.sleep(0.5)
    return out


def run(seconds: float = 20.0, flows: int = 10_000, static_pods: int = 10_000) -> tuple[list[Case], float]:
    cases: list[Case] = []
    base = baseline_mb()
    with Testbed() as bed, tempfile.TemporaryDirectory(prefix="flowtel-bench-memory-") as tmp:
        client, server, dns = bed.add_pod("client"), bed.add_pod("server"), bed.add_pod("dns")
        bed.start_udp_sink(server, UDP_PORT)
        bed.start_dnsmasq(dns, hosts={f"q{i}.bench.local": ["198.51.100.1"] for i in range(50)})
        cases += _shipped_cases(bed, client, Path(tmp), seconds, static_pods)
        variants: list[tuple[str, str, bool]] = [("idle (minimal config: ebpf, file, flows)", "", False)]
        if static_pods:
            try:
                import processors.k8sattributes.static_source  # noqa: F401
            except ImportError:
                pass
            else:
                pods = Path(tmp) / "pods.yaml"
                _static_pods(pods, static_pods)
                extra = f"processors:\n  k8sattributes:\n    source: static\n    static: {{path: {pods}}}\n"
                variants.append((f"idle + k8sattributes static {static_pods // 1000}k pods", extra, False))
        variants.append((f"sustained load ({flows // 1000}k flows/interval + DNS)", "", True))
        for i, (name, extra, load) in enumerate(variants):
            workdir = Path(tmp) / f"case{i}"
            workdir.mkdir()
            agent = Agent(agent_config(bed, workdir, extra=extra), workdir / "agent.log").start()
            senders = []
            try:
                agent.wait_attached(client)
                if load:
                    # Spread over 10 s: `flows` distinct destination ports per collection interval.
                    senders.append(start_sender(client, server.ipv4, 10000, ports=flows, interval=10.0 / flows))
                    senders.append(client.popen([sys.executable, "-c", DNS_FLOOD_CODE, dns.ipv4, "200"],
                                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL))
                time.sleep(12 if load else 3)  # the first drains (and the first full interval under load)
                cases.append(Case(name, _sample(agent, seconds)))
            finally:
                for s in senders:
                    s.kill()
                    s.wait()
                agent.stop()
    return cases, base


@dataclass
class WorkloadCase:
    tree: str
    workload: str
    value: float  # the workload's own result (connections/s, datagrams/s, …)
    before: float  # RSS once settled, before the workload
    samples: list[float]  # RSS every 0.5 s from the workload's start to the end of the tail

    @property
    def peak(self) -> float:
        return max(self.samples)


def workload_cases(workloads: list[str], *, seconds: float = 5.0, tail: float = 25.0, rounds: int = 1,
                   trees: list[Path | None] | None = None) -> list[WorkloadCase]:
    """RSS of a fresh shipped-config agent over each workload and its tail (module docstring)."""
    import threading

    from bench.datapath import Bed, shipped_config as datapath_config

    trees = trees or [None]
    out: list[WorkloadCase] = []
    Testbed.cleanup_stale()
    with Testbed() as testbed, tempfile.TemporaryDirectory(prefix="flowtel-bench-memory-wl-") as tmp:
        bed = Bed(testbed, Path(tmp))
        n = 0
        for _ in range(rounds):
            for w in workloads:
                for tree in trees:
                    n += 1
                    workdir = Path(tmp) / f"wl{n}"
                    workdir.mkdir()
                    config, _ = datapath_config(testbed.interface_glob, workdir)
                    agent = Agent(config, workdir / "agent.log", tree=tree).start()
                    try:
                        for pod in testbed.pods.values():
                            agent.wait_attached(pod)
                        time.sleep(12)  # the first drains and the start's one-time work
                        before = rss_mb(agent.pid)
                        samples: list[float] = []
                        stop = threading.Event()

                        def sample() -> None:
                            while not stop.wait(0.5):
                                samples.append(rss_mb(agent.pid))

                        t = threading.Thread(target=sample, daemon=True)
                        t.start()
                        value = bed.run(w, seconds)
                        time.sleep(tail)
                        stop.set()
                        t.join()
                        if not agent.alive():
                            raise RuntimeError(f"flowtel run exited: {agent.log.read_text()[-2000:]}")
                        out.append(WorkloadCase(str(tree or "this tree"), w, value, before, samples))
                        print(f"{out[-1].tree:24} {w:6} before {before:6.1f} peak {out[-1].peak:6.1f} "
                              f"end {samples[-1]:6.1f} MB ({value:,.0f}/s)", file=sys.stderr, flush=True)
                    finally:
                        agent.stop()
    return out


def workload_report(cases: list[WorkloadCase]) -> str:
    lines = [f"{'agent':24} {'workload':8} {'rate/s':>10} {'before MB':>10} {'peak MB':>8} {'end MB':>8}   (medians of rounds)"]
    keys = sorted({(c.tree, c.workload) for c in cases}, key=lambda k: (k[1], k[0]))
    for tree, w in keys:
        cs = [c for c in cases if (c.tree, c.workload) == (tree, w)]
        lines.append(f"{tree:24} {w:8} {statistics.median(c.value for c in cs):10,.0f} "
                     f"{statistics.median(c.before for c in cs):10.1f} {statistics.median(c.peak for c in cs):8.1f} "
                     f"{statistics.median(c.samples[-1] for c in cs):8.1f}")
    lines.append(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return "\n".join(lines)


def _shipped_cases(bed: Testbed, client: Pod, tmp: Path, seconds: float, pods: int) -> list[Case]:
    from bench.k8sattributes import _serve
    from bench.kubeapi import start_server

    out: list[Case] = []
    runs: list[tuple[str, str | None]] = [("idle, shipped config", None)]
    server = conn = None
    if pods:
        server, conn, kubeconfig = start_server(_serve, pods)
        runs.append((f"idle, shipped config + k8sattributes, {pods // 1000}k pods from the API", kubeconfig))
    try:
        for i, (name, kubeconfig) in enumerate(runs):
            workdir = tmp / f"shipped{i}"
            workdir.mkdir()
            agent = Agent(shipped_config(bed, workdir, kubeconfig), workdir / "agent.log").start()
            try:
                agent.wait_attached(client)
                time.sleep(15 if kubeconfig else 3)  # the informers' initial lists, the first drains
                # Idle CPU is the steady state: from one collection interval (plus the start's
                # one-time work: the first drains, the kernel-symbol index) after attach.
                cpu_from = time.monotonic() + (0 if kubeconfig else IDLE_CPU_SETTLE_S - 3)
                cpu: list[tuple[float, float]] = []
                samples = _sample(agent, seconds, cpu if seconds > IDLE_CPU_SETTLE_S else None, cpu_from)
                cores = (cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0]) if len(cpu) > 1 else None
                out.append(Case(name, samples, cores))
            finally:
                agent.stop()
    finally:
        if conn is not None:
            conn.send("stop")
        if server is not None:
            server.join(10)
    return out


def report(res: tuple[list[Case], float]) -> str:
    cases, base = res
    lines = [f"{'case':64} {'median MB':>10} {'peak MB':>8} {'vs bcc baseline':>16} {'vs 200 MB':>10} {'cores':>7}",
             f"{'bcc trivial program (baseline)':64} {base:10.1f} {base:8.1f} {1.0:16.2f} {base / TARGET_MB:10.2f}"]
    for c in cases:
        cores = "" if c.cores is None else f"{c.cores:7.4f}"
        lines.append(f"{c.name:64} {c.median:10.1f} {c.peak:8.1f} {c.peak / base:16.2f} {c.peak / TARGET_MB:10.2f} {cores}")
    lines.append(f"load average during the run: {os.getloadavg()[0]:.2f}")
    lines.append("")
    lines.append(f"{'part (cumulative, fresh interpreter)':72} {'RSS MB':>7} {'+MB':>6}")
    prev = 0.0
    for name, mb in parts():
        lines.append(f"{name:72} {mb:7.1f} {mb - prev:6.1f}")
        prev = mb
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--flows", type=int, default=10_000)
    parser.add_argument("--static-pods", type=int, default=10_000, help="0 to skip the k8sattributes case")
    parser.add_argument("--workloads", default="", help="datapath workloads to sample RSS over, e.g. conn,udp64")
    parser.add_argument("--workload-seconds", type=float, default=5.0)
    parser.add_argument("--tail", type=float, default=25.0, help="seconds sampled after each workload")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the workload cases")
    parser.add_argument("--agent-tree", type=Path, action="append", default=[],
                        help="another checkout to run alternately with this one (its .venv); repeatable")
    parser.add_argument("--only-workloads", action="store_true", help="skip the idle, pods and load cases")
    args = parser.parse_args(argv)
    if args.workloads:
        trees: list[Path | None] = [*args.agent_tree, None]
        print(workload_report(workload_cases(args.workloads.split(","), seconds=args.workload_seconds, tail=args.tail,
                                             rounds=args.rounds, trees=trees)), flush=True)
        if args.only_workloads:
            return 0
    print(report(run(args.seconds, args.flows, args.static_pods)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
