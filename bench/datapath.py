"""Datapath overhead: iperf3 between two network-namespace pods, with and without observers.

Each scenario runs in the same process, alternating, several times; results are medians,
and every number is quoted as a ratio against the no-observer baseline of the same run,
because the machines are shared and noisy. Observers:

- ``none``: nothing attached (the baseline);
- ``flowtel``: ``flowtel run`` with the ebpf receiver on both host-side veths;
- ``tcpdump``: ``tcpdump -w /dev/null`` on the client's host-side veth (packet capture, the
  usual alternative).

Run with ``make bench`` or ``python -m bench.datapath [--reps N] [--seconds S]``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from testbed import Pod, Testbed, require_tool


@dataclass(slots=True)
class Result:
    scenario: str
    observer: str
    value: float  # bits/s for TCP, packets/s for UDP


class _Observer:
    name = "none"

    def __enter__(self) -> "_Observer":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Flowtel(_Observer):
    name = "flowtel"

    def __init__(self, bed: Testbed, workdir: Path) -> None:
        self.bed = bed
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "_Flowtel":
        cfg = self.workdir / "bench.yaml"
        cfg.write_text(
            f"""
receivers:
  ebpf:
    interfaces: ["{self.bed.interface_glob}"]
    collection_interval: 10s
exporters:
  file:
    path: {self.workdir / "flows.log"}
service:
  pipelines:
    logs: {{receivers: [ebpf], exporters: [file]}}
"""
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowtel.cli", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["tc", "filter", "show", "dev", next(iter(self.bed.pods.values())).host_ifname, "ingress"],
                capture_output=True,
                text=True,
            ).stdout
            if "flowtel" in out:
                return self
            time.sleep(0.1)
        raise RuntimeError("flowtel did not attach within 60 s")

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class _Tcpdump(_Observer):
    name = "tcpdump"

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "_Tcpdump":
        self.proc = subprocess.Popen(
            [require_tool("tcpdump"), "-i", self.pod.host_ifname, "-w", "/dev/null", "-s", "262144"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), True)
        self.proc.stderr.readline()  # "listening on …": the capture is live
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)


def _iperf3(client: Pod, server_ip: str, args: list[str], seconds: float) -> dict:
    res = client.exec(
        [require_tool("iperf3"), "-c", server_ip, "-J", "-t", str(seconds), *args],
        timeout=seconds + 30,
    )
    return json.loads(res.stdout)


def _scenarios(seconds: float) -> Iterator[tuple[str, list[str], Callable[[dict], float]]]:
    yield "tcp 1 stream (bits/s)", [], lambda r: r["end"]["sum_received"]["bits_per_second"]
    yield "tcp 4 streams (bits/s)", ["-P", "4"], lambda r: r["end"]["sum_received"]["bits_per_second"]
    # Small UDP packets, unlimited rate: packets per second the receiver got.
    yield (
        "udp 64B (pkts/s)",
        ["-u", "-b", "0", "-l", "64"],
        lambda r: (r["end"]["sum"]["packets"] - r["end"]["sum"]["lost_packets"]) / r["end"]["sum"]["seconds"],
    )


def run(reps: int = 5, seconds: float = 3.0) -> list[Result]:
    results: list[Result] = []
    Testbed.cleanup_stale()
    with Testbed() as bed, tempfile.TemporaryDirectory(prefix="flowtel-bench-") as tmp:
        client, server = bed.add_pod("client"), bed.add_pod("server")
        server.popen([require_tool("iperf3"), "-s", "-B", server.ipv4], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        observers: list[Callable[[], _Observer]] = [
            _Observer,
            lambda: _Flowtel(bed, Path(tmp)),
            lambda: _Tcpdump(client),
        ]
        for scenario, args, metric in _scenarios(seconds):
            for _ in range(reps):
                # Interleave observers within each repetition so drift hits all alike.
                for make in observers:
                    with make() as obs:
                        value = metric(_iperf3(client, server.ipv4, args, seconds))
                    results.append(Result(scenario, obs.name, value))
    return results


def report(results: list[Result]) -> str:
    lines = [f"{'scenario':<24} {'observer':<8} {'median':>14} {'ratio':>7}  runs"]
    scenarios = list(dict.fromkeys(r.scenario for r in results))
    for scenario in scenarios:
        by_obs: dict[str, list[float]] = {}
        for r in results:
            if r.scenario == scenario:
                by_obs.setdefault(r.observer, []).append(r.value)
        base = statistics.median(by_obs["none"])
        for obs, values in by_obs.items():
            med = statistics.median(values)
            lines.append(f"{scenario:<24} {obs:<8} {med:>14.4g} {med / base:>7.3f}  {len(values)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    print(report(run(args.reps, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
