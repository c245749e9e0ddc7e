"""Memory: resident memory of a real ``flowtel run``, idle and under sustained load.

Each case starts a fresh agent (its own process, as a DaemonSet would) with the bundled
default config (ebpf receiver with DNS, file exporter, flows extension) pointed at the
veths of a testbed of pods, waits until it is attached and has drained a few intervals,
then samples its VmRSS every 0.5 s:

- ``idle``: no traffic at all for ``--seconds``;
- ``idle + k8sattributes static N pods``: the same with the k8sattributes processor naming
  flows from a static file of N pods (there is no API server here; the informer caches'
  own cost per pod at 1k/10k/50k pods is measured by bench/k8sattributes.py, which this
  bench does not duplicate);
- ``sustained load``: a paced UDP sender cycling over ``--flows`` destination ports (so
  that many distinct flows per 10 s interval) plus DNS queries to a dnsmasq pod at about
  200/s, for ``--seconds``; the maximum and the final RSS are reported.

Baseline, same run: a fresh interpreter that has imported bcc and compiled and loaded one
trivial program (DESIGN.md: ≈ 150 MB, LLVM/clang in process), i.e. the floor of any
bcc-based Python agent. Ratios are against it; the issue's target is ≤ 200 MB resident
with 10k pods cached.

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

from bench.startup import BASELINE_CODE, UDP_PORT, Agent, agent_config, rss_mb, start_sender
from testbed import Testbed

TARGET_MB = 200.0
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


def _sample(agent: Agent, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not agent.alive():
            raise RuntimeError(f"flowtel run exited: {agent.log.read_text()[-2000:]}")
        out.append(rss_mb(agent.pid))
        time.sleep(0.5)
    return out


def run(seconds: float = 20.0, flows: int = 10_000, static_pods: int = 10_000) -> tuple[list[Case], float]:
    cases: list[Case] = []
    base = baseline_mb()
    with Testbed() as bed, tempfile.TemporaryDirectory(prefix="flowtel-bench-memory-") as tmp:
        client, server, dns = bed.add_pod("client"), bed.add_pod("server"), bed.add_pod("dns")
        bed.start_udp_sink(server, UDP_PORT)
        bed.start_dnsmasq(dns, hosts={f"q{i}.bench.local": ["198.51.100.1"] for i in range(50)})
        variants: list[tuple[str, str, bool]] = [("idle (default config)", "", False)]
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


def report(res: tuple[list[Case], float]) -> str:
    cases, base = res
    lines = [f"{'case':46} {'median MB':>10} {'peak MB':>8} {'vs bcc baseline':>16} {'vs 200 MB':>10}",
             f"{'bcc trivial program (baseline)':46} {base:10.1f} {base:8.1f} {1.0:16.2f} {base / TARGET_MB:10.2f}"]
    for c in cases:
        lines.append(f"{c.name:46} {c.median:10.1f} {c.peak:8.1f} {c.peak / base:16.2f} {c.peak / TARGET_MB:10.2f}")
    lines.append(f"load average during the run: {os.getloadavg()[0]:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--flows", type=int, default=10_000)
    parser.add_argument("--static-pods", type=int, default=10_000, help="0 to skip the k8sattributes case")
    args = parser.parse_args(argv)
    print(report(run(args.seconds, args.flows, args.static_pods)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
