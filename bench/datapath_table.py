"""The pure half of bench/datapath.py: parse the clients' outputs and /proc, and turn the
samples of one run into the table (medians of alternating rounds, ratios in the same run).

No I/O here, so bench/test_datapath_table.py can check every parser and the arithmetic
against fixed inputs (real iperf3 3.12 JSON and dnsperf 2.10 output).
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

NONE, FLOWTEL, TCPDUMP = "none", "flowtel", "tcpdump"
OBSERVERS = (NONE, FLOWTEL, TCPDUMP)


@dataclass(frozen=True, slots=True)
class Workload:
    key: str
    title: str  # the row's name in the table
    unit: str  # of the absolute no-observer value
    scale: float  # value / scale is printed in `unit`
    target: float  # the target ratio to no observer


WORKLOADS: tuple[Workload, ...] = (
    Workload("tcp", "TCP, 1 stream (iperf3)", "Gbit/s", 1e9, 0.98),
    Workload("udp64", "UDP 64-byte flood (iperf3, datagrams/s received)", "k/s", 1e3, 0.95),
    Workload("dns", "DNS, dnsperf against dnsmasq (queries/s)", "k/s", 1e3, 0.95),
    Workload("conn", "TCP connection rate (short connections/s)", "k/s", 1e3, 0.95),
)
FLOOD_CPU_TARGET = 0.05  # cores, during any workload
IDLE_CPU_TARGET = 0.01  # cores
RSS_TARGET_MB = 200.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One workload run under one observer in one round."""

    workload: str
    observer: str
    round: int
    value: float  # the workload's rate: bits/s, datagrams/s, queries/s, connections/s
    observer_cores: float | None = None  # observer's CPU seconds per second (None: no observer)
    busy_after_tail: bool = False  # the observer was still working when its CPU was last read


@dataclass(frozen=True, slots=True)
class Row:
    workload: Workload
    base: float  # median no-observer value
    ratio: Mapping[str, float]  # observer -> median(observer) / median(none)
    spread: Mapping[str, tuple[float, float]]  # observer -> (min, max) of the per-round ratios
    flowtel_vs_tcpdump: float
    cores: Mapping[str, float]  # observer -> median CPU seconds per second
    cores_lower_bound: Mapping[str, bool]  # observer -> some sample was still busy after the tail
    rounds: int


# -- parsers -------------------------------------------------------------------------------

def iperf3_error(result: Mapping[str, Any]) -> str | None:
    err = result.get("error")
    return str(err) if err else None


def iperf3_tcp_bits_per_second(result: Mapping[str, Any]) -> float:
    """Receiver-side throughput of an ``iperf3 -J`` TCP run."""
    if (err := iperf3_error(result)) is not None:
        raise ValueError(f"iperf3 failed: {err}")
    return float(result["end"]["sum_received"]["bits_per_second"])


def iperf3_udp_received_per_second(result: Mapping[str, Any]) -> float:
    """Datagrams per second the iperf3 server received in a ``-u`` run (sent − lost)."""
    if (err := iperf3_error(result)) is not None:
        raise ValueError(f"iperf3 failed: {err}")
    end = result["end"]
    s = end.get("sum_received") or end["sum"]  # sum_received since iperf 3.1x; both hold the server's loss
    seconds = float(s["seconds"])
    if seconds <= 0:
        raise ValueError("iperf3 reported a run of 0 seconds")
    return (int(s["packets"]) - int(s["lost_packets"])) / seconds


_DNSPERF_FIELD = re.compile(r"^\s*(Queries sent|Queries completed|Queries lost|Run time \(s\)|Queries per second):\s+([0-9.]+)",
                            re.M)


@dataclass(frozen=True, slots=True)
class DnsperfResult:
    sent: int
    completed: int
    lost: int
    run_time_s: float
    qps: float


def parse_dnsperf(text: str) -> DnsperfResult:
    """The ``Statistics:`` block dnsperf prints at the end of a run."""
    fields = {m.group(1): m.group(2) for m in _DNSPERF_FIELD.finditer(text)}
    missing = {"Queries sent", "Queries completed", "Queries lost", "Run time (s)", "Queries per second"} - fields.keys()
    if missing:
        raise ValueError(f"dnsperf output lacks {sorted(missing)}: {text[-500:]!r}")
    return DnsperfResult(int(fields["Queries sent"]), int(fields["Queries completed"]), int(fields["Queries lost"]),
                         float(fields["Run time (s)"]), float(fields["Queries per second"]))


def parse_conn_client(text: str) -> float:
    """Connections per second from the connection-rate client's one JSON line."""
    r = json.loads(text.strip().splitlines()[-1])
    if r["connections"] == 0:
        raise ValueError(f"no connection completed ({r['errors']} errors)")
    return float(r["connections"]) / float(r["seconds"])


def proc_stat_ticks(stat: str) -> tuple[int, int]:
    """(ppid, utime + stime in clock ticks) from the text of /proc/PID/stat.

    The command name (field 2) is in parentheses and may hold spaces or ')', so fields are
    counted from the last ')'."""
    rest = stat[stat.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    return int(rest[1]), int(rest[11]) + int(rest[12])


_TCPDUMP_DROPPED = re.compile(r"^(\d+) packets dropped by kernel", re.M)
_TCPDUMP_RECEIVED = re.compile(r"^(\d+) packets received by filter", re.M)


def tcpdump_drops(stderr: str) -> tuple[int, int] | None:
    """(received by filter, dropped by kernel) from tcpdump's exit summary, if printed."""
    rec, drop = _TCPDUMP_RECEIVED.search(stderr), _TCPDUMP_DROPPED.search(stderr)
    if rec is None or drop is None:
        return None
    return int(rec.group(1)), int(drop.group(1))


def prometheus_sums(text: str, names: Iterable[str]) -> dict[str, float]:
    """The sum over all series of each metric in ``names`` from Prometheus text exposition
    (``name{labels} value [timestamp]``); a name with no series is absent."""
    wanted = set(names)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            rest = rest[rest.rindex("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        if name in wanted:
            out[name] = out.get(name, 0.0) + float(rest.split()[0])
    return out


@dataclass(frozen=True, slots=True)
class Check:
    """What flowtel counted in one condition against the kernel's and the clients' own counts."""

    round: int
    forward_ingress: float  # networkobservability_forward_count{direction=ingress}
    link_rx_packets: int  # Σ rx_packets of the host-side veths (what the pods sent), ip -s link
    forward_egress: float
    link_tx_packets: int
    dns_requests: float  # networkobservability_dns_request_count
    dns_queries_sent: int  # dnsperf's "Queries sent"
    lost_events: float  # hubble_lost_events_total


def render_checks(checks: list[Check]) -> str:
    out = ["| round | forward_count ingress / Σ veth rx_packets | forward_count egress / Σ veth tx_packets "
           "| dns_request_count / dnsperf queries sent | hubble_lost_events_total |",
           "|---|---|---|---|---|"]
    for c in checks:
        def ratio(a: float, b: float) -> str:
            return f"{a:,.0f} / {b:,.0f} = {a / b:.4f}" if b else f"{a:,.0f} / 0"
        out.append(f"| {c.round + 1} | {ratio(c.forward_ingress, c.link_rx_packets)} "
                   f"| {ratio(c.forward_egress, c.link_tx_packets)} | {ratio(c.dns_requests, c.dns_queries_sent)} "
                   f"| {c.lost_events:,.0f} |")
    return "\n".join(out)


# -- the table -----------------------------------------------------------------------------

def summarize(samples: Iterable[Sample]) -> list[Row]:
    """One row per workload that has no-observer samples: ratios of medians, and the spread
    of the ratios each round gave (observer / the same round's no-observer value)."""
    samples = list(samples)
    rows = []
    for w in WORKLOADS:
        mine = [s for s in samples if s.workload == w.key]
        by_obs = {o: [s for s in mine if s.observer == o] for o in OBSERVERS}
        if not by_obs[NONE]:
            continue
        base = statistics.median(s.value for s in by_obs[NONE])
        base_by_round = {s.round: s.value for s in by_obs[NONE]}
        ratio: dict[str, float] = {}
        spread: dict[str, tuple[float, float]] = {}
        cores: dict[str, float] = {}
        lower: dict[str, bool] = {}
        for o, ss in by_obs.items():
            if not ss:
                continue
            ratio[o] = statistics.median(s.value for s in ss) / base if base else float("nan")
            per_round = [s.value / base_by_round[s.round] for s in ss if base_by_round.get(s.round)]
            if per_round:
                spread[o] = (min(per_round), max(per_round))
            cs = [s.observer_cores for s in ss if s.observer_cores is not None]
            if cs:
                cores[o] = statistics.median(cs)
                lower[o] = any(s.busy_after_tail for s in ss)
        f, t = ratio.get(FLOWTEL), ratio.get(TCPDUMP)
        rows.append(Row(w, base, ratio, spread, f / t if f is not None and t else float("nan"), cores,
                        lower, len(by_obs[NONE])))
    return rows


def _ratio_cell(row: Row, obs: str) -> str:
    if obs not in row.ratio:
        return "–"
    lo, hi = row.spread.get(obs, (row.ratio[obs], row.ratio[obs]))
    return f"{row.ratio[obs]:.2f} ({lo:.2f}–{hi:.2f})"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(rows: list[Row], *, idle_cores: float | None, rss_mb: float | None) -> str:
    """The table as Markdown (readable in a terminal too, pasted as is into docs/performance.md)."""
    out = [
        "| workload | no observer | flowtel | tcpdump on the same veths | flowtel / tcpdump "
        "| flowtel agent CPU (cores) | tcpdump CPU (cores) | target met (ratio; above tcpdump; CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r.ratio.get(FLOWTEL)
        fc = r.cores.get(FLOWTEL)
        met = "–" if f is None else " ; ".join([
            _met(f >= r.workload.target) + f" (≥ {r.workload.target})",
            _met(r.flowtel_vs_tcpdump > 1.0) if TCPDUMP in r.ratio else "–",
            "–" if fc is None else _met(fc <= FLOOD_CPU_TARGET) + f" (≤ {FLOOD_CPU_TARGET})",
        ])
        out.append(
            f"| {r.workload.title} | 1.00 ({r.base / r.workload.scale:.3g} {r.workload.unit}) "
            f"| {_ratio_cell(r, FLOWTEL)} | {_ratio_cell(r, TCPDUMP)} | {r.flowtel_vs_tcpdump:.2f} "
            f"| {'–' if fc is None else ('≥ ' if r.cores_lower_bound.get(FLOWTEL) else '') + f'{fc:.3f}'} "
            f"| {'–' if TCPDUMP not in r.cores else f'{r.cores[TCPDUMP]:.3f}'} | {met} |"
        )
    rounds = max((r.rounds for r in rows), default=0)
    out.append("")
    out.append(f"Medians of {rounds} alternating rounds; in brackets the lowest and highest ratio a single round gave "
               "(observer / no observer of the same round).")
    if any(r.cores_lower_bound.get(FLOWTEL) for r in rows):
        out.append("≥: in some round the agent was still busy at the end of the time charged to the workload "
                   "(the work outlasted it), so its CPU is a lower bound.")
    if idle_cores is not None:
        out.append(f"flowtel agent CPU idle: {idle_cores:.4f} cores "
                   f"(target ≤ {IDLE_CPU_TARGET}: {_met(idle_cores <= IDLE_CPU_TARGET)}).")
    if rss_mb is not None:
        out.append(f"flowtel agent resident memory, highest sample after the workloads: {rss_mb:.0f} MB "
                   f"(target ≤ {RSS_TARGET_MB:.0f} MB with 10k pods cached: this run caches none; "
                   "bench/memory.py measures that case).")
    return "\n".join(out)
