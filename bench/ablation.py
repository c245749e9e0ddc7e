"""Where the datapath ratio goes: the datapath bench's UDP 64-byte flood and TCP 1 stream under
observers that attach only parts of flowtel, alternating with no observer, in one run.

Not a test: run as root, ``.venv/bin/python -m bench.ablation [--rounds 3] [--seconds 5]``.

Conditions (each round runs every one, in an order that rotates from round to round, each
between two runs with no observer: its ratio is to the mean of those two):

- ``none``: nothing attached;
- ``clsact``: the clsact qdisc on every host-side veth of the testbed, no filter;
- ``empty_tc``: a tc program that returns TC_ACT_UNSPEC (flowtel's verdict) on both hooks of
  those veths, attached as flowtel attaches (direct action, on the clsact qdisc);
- ``tc_only``: ``flowtel run`` with the shipped config but the kernel-events tracepoints off
  (``kernel_events.drops.enabled`` and ``tcp.enabled`` false): flowtel's tc programs and DNS
  path, the drain, nothing else;
- ``tracepoints_only``: the shipped config with ``interfaces`` matching no link: the drop
  (``skb:kfree_skb``) and TCP tracepoints only;
- ``flowtel``: the shipped config (as bench.datapath changes it for a shared machine).

``--baseline-tree PATH`` adds ``tracepoints_only@base`` and ``flowtel@base``: the same two
agents from another checkout (its own .venv), for a before/after in the same run.

For the UDP flood, the server namespace's ``UdpRcvbufErrors`` (the kernel's count of datagrams
its full sockets refused, each one ``skb:kfree_skb`` run) is read around every run and printed
per datagram received: the drop tracepoint's share of the ratio is its ns/run times that.
Values are medians of the rounds' ratios.

Unpinned, the UDP flood is bistable on a 2-CPU machine: in some runs the server keeps up
(almost no refused datagrams, ~115k/s received), in others it falls behind (a refused datagram
for every 3-5 received, 50-70k/s), whatever is attached, depending on where the scheduler puts
the client, the server and the softirq work. ``--pin`` puts the iperf3 client and server on
separate CPUs (``iperf3 -A 0,1``) so that runs differ by what the observer costs, not by that.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml  # type: ignore[import-untyped]

from bench.bpf_runtime import _FLOOR_C, udp_rcvbuf_errors
from bench.datapath import Bed, cpu_seconds, shipped_config
from bench.datapath_table import iperf3_tcp_bits_per_second, iperf3_udp_received_per_second
from bench.startup import Agent
from testbed import Pod, Testbed

WORKLOADS = ("udp64", "tcp")
CONDITIONS = ("none", "clsact", "empty_tc", "tc_only", "tracepoints_only", "flowtel")
# A glob no link of any machine has: the agent attaches its tc programs nowhere.
NO_LINK = "flowtel-ablation-none-*"


@dataclass(frozen=True, slots=True)
class Sample:
    round: int
    condition: str
    workload: str
    value: float  # bits/s (tcp) or datagrams/s received (udp64)
    refused: int  # UdpRcvbufErrors in the server namespace over the run
    received: int  # datagrams the server received (udp64), else 0
    agent_cores: float | None
    seq: int  # position in the run


@contextlib.contextmanager
def _clsact(pods: list[Pod]) -> Iterator[None]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        indexes = [ipr.link_lookup(ifname=p.host_ifname)[0] for p in pods]
        try:
            for index in indexes:
                ipr.tc("add", "clsact", index=index)
            yield
        finally:
            for index in indexes:
                ipr.tc("del", "clsact", index=index)


def _agent_config(mode: str, bed: Testbed, workdir: Path) -> Path:
    path, _ = shipped_config(bed.interface_glob, workdir)
    cfg = yaml.safe_load(path.read_text())
    ebpf = cfg["receivers"]["ebpf"]
    if mode == "tc_only":
        ebpf["kernel_events"] = {"drops": {"enabled": False}, "tcp": {"enabled": False}}
    elif mode == "tracepoints_only":
        ebpf["interfaces"] = [NO_LINK]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@contextlib.contextmanager
def _agent(mode: str, bed: Testbed, workdir: Path, tree: Path | None, settle: float) -> Iterator[Agent]:
    workdir.mkdir(parents=True, exist_ok=True)
    agent = Agent(_agent_config(mode, bed, workdir), workdir / "agent.log", tree=tree).start()
    try:
        if mode != "tracepoints_only":
            for pod in bed.pods.values():
                agent.wait_attached(pod)
        # Start-up (compile, attach, first drains) is not what is measured: wait until quiet.
        time.sleep(settle)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not agent.alive():
                raise RuntimeError(f"flowtel run exited: {agent.log.read_text()[-2000:]}")
            c0, t0 = cpu_seconds(agent.pid), time.monotonic()
            time.sleep(1.5)
            if (cpu_seconds(agent.pid) - c0) / (time.monotonic() - t0) < 0.05:
                break
        yield agent
    finally:
        agent.stop()


def _workload(bed: Bed, w: str, seconds: float, pin: bool) -> float:
    """One run of ``w``: as bench.datapath runs it, or with ``pin`` the iperf3 client on CPU 0
    and its server on CPU 1 (``iperf3 -A 0,1``)."""
    if not pin:
        return bed.run(w, seconds)
    if w == "tcp":
        return iperf3_tcp_bits_per_second(bed.iperf3(["-A", "0,1"], seconds))
    if w == "udp64":
        return iperf3_udp_received_per_second(bed.iperf3(["-A", "0,1", "-u", "-b", "0", "-l", "64"], seconds))
    raise ValueError(f"--pin is for the iperf3 workloads, not {w!r}")


def run(rounds: int, seconds: float, conditions: tuple[str, ...], workloads: tuple[str, ...],
        baseline: Path | None, settle: float, pin: bool = False,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> tuple[list[Sample], list[float]]:
    from bcc import BPF  # type: ignore[import-untyped]  # Debian's python3-bpfcc, no stubs

    from bench.bpf_runtime import _empty_attached

    samples: list[Sample] = []
    loads: list[float] = []
    Testbed.cleanup_stale()
    with Testbed() as testbed, tempfile.TemporaryDirectory(prefix="flowtel-bench-ablation-") as tmp:
        bed = Bed(testbed, Path(tmp))
        pods = list(testbed.pods.values())
        floor = BPF(text=_FLOOR_C)
        fns = {h: floor.load_func(f"bench_floor_{h}", BPF.SCHED_CLS) for h in ("ingress", "egress")}
        try:
            for r in range(rounds):
                observed = [c for c in conditions if c != "none"]
                k = r % len(observed)
                # none, X, none, Y, ..., none: each condition is read against the baseline runs
                # just before and after it, so that the machine's drift (other people's suites)
                # moves both sides of a ratio alike.
                order = [x for c in observed[k:] + observed[:k] for x in ("none", c)] + ["none"]
                for cond in order:
                    loads.append(os.getloadavg()[0])
                    mode, _, where = cond.partition("@")
                    tree = baseline if where == "base" else None
                    ctx: contextlib.AbstractContextManager[Any]
                    if mode == "none":
                        ctx = contextlib.nullcontext()
                    elif mode == "clsact":
                        ctx = _clsact(pods)
                    elif mode == "empty_tc":
                        ctx = _empty_attached(fns, pods)
                    else:
                        ctx = _agent(mode, testbed, Path(tmp) / f"{cond}-{r}", tree, settle)
                    with ctx as obs:
                        for w in workloads:
                            refused0 = udp_rcvbuf_errors(bed.server)
                            c0 = cpu_seconds(obs.pid) if isinstance(obs, Agent) else None
                            t0 = time.monotonic()
                            value = _workload(bed, w, seconds, pin)
                            wall = time.monotonic() - t0
                            cores = None if c0 is None else (cpu_seconds(obs.pid) - c0) / wall
                            refused = udp_rcvbuf_errors(bed.server) - refused0
                            received = int(value * seconds) if w == "udp64" else 0
                            samples.append(Sample(r, cond, w, value, refused, received, cores, len(samples)))
                            log(f"round {r + 1}/{rounds} {cond:24} {w:6} {value:16,.0f}"
                                + (f"  refused {refused:,} ({refused / max(received, 1):.2f} per received)"
                                   if w == "udp64" else "")
                                + ("" if cores is None else f"  agent {cores:.3f} cores"))
                            time.sleep(1.0)
        finally:
            floor.cleanup()
    return samples, loads


def _ratios(samples: list[Sample], cond: str, w: str) -> list[float]:
    """Each run of ``cond`` over the mean of the no-observer runs of ``w`` just before and after it."""
    runs = sorted((s for s in samples if s.workload == w), key=lambda s: s.seq)
    out = []
    for i, s in enumerate(runs):
        if s.condition != cond:
            continue
        near = [runs[j].value for j in (i - 1, i + 1) if 0 <= j < len(runs) and runs[j].condition == "none"]
        if near and cond != "none":
            out.append(s.value / statistics.mean(near))
    return out


def report(samples: list[Sample], loads: list[float]) -> str:
    conditions = [c for c in dict.fromkeys(s.condition for s in samples) if c != "none"]
    workloads = list(dict.fromkeys(s.workload for s in samples))
    lines = ["| condition | " + " | ".join(f"{w} ratio (range)" for w in workloads)
             + " | udp64 refused per received | agent cores (udp64, tcp) |",
             "|---|" + "---|" * len(workloads) + "---|---|"]
    for c in ["none"] + conditions:
        cells = []
        for w in workloads:
            ratios = _ratios(samples, c, w)
            cells.append("1.000" if c == "none" else
                         f"{statistics.median(ratios):.3f} ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else "-")
        per = [s.refused / s.received for s in samples if s.condition == c and s.workload == "udp64" and s.received]
        cores = [statistics.median(v) if v else None for v in
                 ([s.agent_cores for s in samples if s.condition == c and s.workload == w and s.agent_cores is not None]
                  for w in ("udp64", "tcp"))]
        lines.append(f"| {c} | " + " | ".join(cells) + (f" | {statistics.median(per):.2f} |" if per else " | - |")
                     + " " + ", ".join("-" if v is None else f"{v:.3f}" for v in cores) + " |")
    absolute = {w: statistics.median([s.value for s in samples if s.condition == "none" and s.workload == w])
                for w in workloads if any(s.condition == "none" and s.workload == w for s in samples)}
    lines.append("")
    lines.append("no observer (median of its runs): " + ", ".join(
        f"{w} {v / 1e9:.1f} Gbit/s" if w == "tcp" else f"{w} {v / 1e3:.0f}k datagrams/s received"
        for w, v in absolute.items()) + f"; load average (1 min) {min(loads):.2f}–{max(loads):.2f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--baseline-tree", type=Path, help="another checkout: adds its tracepoints_only and flowtel")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds after an agent attached before measuring")
    parser.add_argument("--pin", action="store_true",
                        help="iperf3 client on CPU 0, server on CPU 1 (the unpinned UDP flood is bistable: see the docstring)")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: the bench creates network namespaces and attaches eBPF programs", file=sys.stderr)
        return 2
    conditions = tuple(args.conditions.split(","))
    if args.baseline_tree is not None:
        conditions += tuple(f"{c}@base" for c in ("tracepoints_only", "flowtel") if c in conditions)
    samples, loads = run(args.rounds, args.seconds, conditions, tuple(args.workloads.split(",")),
                         args.baseline_tree, args.settle, args.pin)
    print(report(samples, loads), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(s) for s in samples], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
