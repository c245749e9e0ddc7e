"""Start-up: time from ``flowtel run`` to attached and to the first export (bcc compilation included).

A real ``flowtel run`` (its own process, as a DaemonSet would start it) on a testbed of two
pods with UDP traffic already flowing between them (one datagram every 10 ms), the ebpf
receiver on both host-side veths with a 1 s collection interval, the file exporter.
Measured from just before the process is spawned:

- ``attached``: the tc filter named ``flowtel…`` is on the client's host-side veth;
- ``first export``: the flow log holds its first complete line.

Baseline, same run: a fresh interpreter importing bcc and compiling and loading a trivial
program (``BPF(text="int f(void *c) { return 0; }")``), i.e. what any bcc-based agent pays
before doing anything of its own. Medians of ``--reps`` runs. Also reported against the
issue's target (first export ≤ 10 s).

Run with ``make bench`` or ``python -m bench.startup [--reps 3]``. Also holds the helpers
bench/memory.py uses to run the agent.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed import Pod, Testbed

TARGET_FIRST_EXPORT_S = 10.0
UDP_PORT = 9000
BASELINE_CODE = (
    "from bcc import BPF\n"
    "b = BPF(text='int f(void *c) { return 0; }')\n"
    "b.load_func('f', BPF.SOCKET_FILTER)\n"
)
# A paced sender: `count` datagrams (0 = forever) to dst:port, each every `interval` s,
# cycling the destination port over `ports` ports so that each is a distinct flow.
SENDER_CODE = r"""
import socket, sys, time
dst, port, ports, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
i = 0
nxt = time.monotonic()
while True:
    try:
        s.sendto(b"x" * 32, (dst, port + i % ports))
    except OSError:
        pass
    i += 1
    if interval:
        nxt += interval
        d = nxt - time.monotonic()
        if d > 0:
            time.sleep(d)
"""


def rss_mb(pid: int) -> float:
    """Resident memory of one process (VmRSS), MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_config(bed: Testbed, workdir: Path, *, interval: str = "10s", extra: str = "", dns: bool = True) -> Path:
    """The bundled default config (config/flowtel.yaml), pointed at the testbed's veths and a
    temporary flow log, the flows extension on a free port (others may run agents here)."""
    cfg = workdir / "agent.yaml"
    cfg.write_text(f"""
receivers:
  ebpf:
    interfaces: ["{bed.interface_glob}"]
    collection_interval: {interval}
    max_flows: 65536
    dns: {{enabled: {str(dns).lower()}}}
{extra}
exporters:
  file:
    path: {workdir / "flows.log"}
    max_size_mb: 10
    max_backups: 5
extensions:
  flows:
    endpoint: 127.0.0.1:{free_port()}
service:
  extensions: [flows]
  pipelines:
    logs:
      receivers: [ebpf]
      {"processors: [k8sattributes]" if "k8sattributes" in extra else ""}
      exporters: [file]
""")
    return cfg


class Agent:
    """``flowtel run --config`` as its own process."""

    def __init__(self, config: Path, log: Path, tree: Path | None = None) -> None:
        self.config = config
        self.log = log
        # Another checkout's agent (its own .venv), to compare two builds in one session.
        self.tree = tree
        self.t0 = 0.0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Agent":
        with open(self.log, "wb") as out:
            self.t0 = time.monotonic()
            python = str(self.tree / ".venv" / "bin" / "python") if self.tree is not None else sys.executable
            self.proc = subprocess.Popen([python, "-m", "flowtel.cli", "run", "--config", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=self.tree)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_attached(self, pod: Pod, timeout: float = 120) -> float:
        """Seconds from start until flowtel's tc filter is on the pod's host-side veth."""
        deadline = self.t0 + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"flowtel run exited: {self.log.read_text()[-2000:]}")
            out = subprocess.run(["tc", "filter", "show", "dev", pod.host_ifname, "ingress"],
                                 capture_output=True, text=True).stdout
            if "flowtel" in out:
                return time.monotonic() - self.t0
            time.sleep(0.02)
        raise RuntimeError(f"flowtel did not attach within {timeout} s")

    def wait_first_line(self, path: Path, timeout: float = 120) -> float:
        deadline = self.t0 + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"flowtel run exited: {self.log.read_text()[-2000:]}")
            try:
                with open(path, "rb") as f:
                    if b"\n" in f.read(65536):
                        return time.monotonic() - self.t0
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"no flow exported within {timeout} s")

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_sender(pod: Pod, dst: str, port: int, *, ports: int = 1, interval: float = 0.01) -> subprocess.Popen:
    return pod.popen([sys.executable, "-c", SENDER_CODE, dst, str(port), str(ports), repr(interval)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def baseline_bcc_s() -> float:
    t0 = time.monotonic()
    subprocess.run(["/usr/bin/python3", "-c", BASELINE_CODE], check=True, capture_output=True)
    return time.monotonic() - t0


def run(reps: int = 3) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"baseline": [], "attached": [], "first_export": []}
    with Testbed() as bed, tempfile.TemporaryDirectory(prefix="flowtel-bench-startup-") as tmp:
        client, server = bed.add_pod("client"), bed.add_pod("server")
        bed.start_udp_sink(server, UDP_PORT)
        start_sender(client, server.ipv4, UDP_PORT)
        for rep in range(reps):
            out["baseline"].append(baseline_bcc_s())
            workdir = Path(tmp) / f"rep{rep}"
            workdir.mkdir()
            agent = Agent(agent_config(bed, workdir, interval="1s"), workdir / "agent.log").start()
            try:
                out["attached"].append(agent.wait_attached(client))
                out["first_export"].append(agent.wait_first_line(workdir / "flows.log"))
            finally:
                agent.stop()
    return out


def report(res: dict[str, list[float]]) -> str:
    base = statistics.median(res["baseline"])
    lines = [f"{'':34} {'median s':>9} {'runs':>24} {'vs bcc baseline':>16} {'vs 10 s target':>15}"]
    for key, label in (("baseline", "bcc trivial program (baseline)"), ("attached", "flowtel run → attached"),
                       ("first_export", "flowtel run → first export (1 s)")):
        med = statistics.median(res[key])
        runs = ", ".join(f"{v:.2f}" for v in res[key])
        lines.append(f"{label:34} {med:9.2f} {runs:>24} {med / base:16.2f} {med / TARGET_FIRST_EXPORT_S:15.2f}")
    lines.append(f"load average during the run: {os.getloadavg()[0]:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    print(report(run(args.reps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
