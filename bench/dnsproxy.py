"""Proxy throughput and added latency (issue 8): ``python -m bench.dnsproxy`` (root).

A throwaway testbed: dnsmasq in a "dns" pod, a policed "client" pod whose queries go through
`flowtel dnsproxy`, an unpoliced "direct" pod asking dnsmasq itself (all dual-stack). The
same load runs from both in the same run, over IPv4 and over IPv6, so the difference is what
the proxy adds: sequential queries give the latency (median, p99), parallel sockets (each
keeping one query in flight for ``--duration`` seconds) the queries per second, and the
proxy's CPU time over its load (from /proc) the CPU per query, which varies less than
queries per second on a shared machine. The proxy runs as deployed by default: no
``--upstream``, each query forwarded to the resolver the client asked (read from the
transparent socket). ``--flow-log`` runs the proxy without and with ``--flow-log`` instead,
alternating ``--rounds`` pairs, and reports what the flow log costs as ratios of the medians.
``--baseline REF`` runs the code of git revision REF (exported with ``git archive`` into a
temporary directory, nothing written to the repository) alternating with this tree's,
``--rounds`` pairs in the same run, and reports this tree's queries/s and CPU per query as
ratios of the medians to REF's: what a change costs, measured on the same loaded machine.
Not a test: numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from dnsproxy.datapath import uninstall
from flowtel.testbed import Pod, Testbed

_LOAD = r"""
import json, select, socket, struct, sys, time
server, name, count, parallel, duration = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
def query(qid):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack("!HH", 1, 1)
# Sequential: latency of each query alone.
fam = socket.AF_INET6 if ":" in server else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.connect((server, 53)); s.settimeout(2)
lat, errors = [], 0
for i in range(count):
    t0 = time.perf_counter(); s.send(query(i & 0xFFFF))
    try:
        s.recv(4096); lat.append(time.perf_counter() - t0)
    except socket.timeout:
        errors += 1
# Parallel: `parallel` sockets, each keeping one query in flight, for `duration` seconds.
socks = []
for _ in range(parallel):
    p = socket.socket(fam, socket.SOCK_DGRAM); p.connect((server, 53)); p.setblocking(False); socks.append(p)
sent = done = 0
t0 = time.perf_counter()
end = t0 + duration
for p in socks:
    p.send(query(sent & 0xFFFF)); sent += 1
while True:
    ready, _, _ = select.select(socks, [], [], 2)
    if not ready:
        errors += sent - done  # unanswered within 2 s: lost
        break
    now = time.perf_counter()
    for p in ready:
        p.recv(4096); done += 1
        if now < end:
            p.send(query(sent & 0xFFFF)); sent += 1
    if done == sent:
        break
qps = done / (time.perf_counter() - t0)
lat.sort()
print(json.dumps({"median_ms": lat[len(lat)//2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1e3, "qps": qps,
                  "answered": done, "errors": errors}))
"""

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toPorts: [{ports: [{port: "53"}], rules: {dns: [{matchPattern: "*"}]}}]
  - toFQDNs: [{matchPattern: "*.bench.test"}]
"""


def _load(pod: Pod, server: str, count: int, parallel: int, duration: float) -> dict[str, Any]:
    res = pod.exec([sys.executable, "-c", _LOAD, server, "api.bench.test", str(count), str(parallel), str(duration)],
                   timeout=count + duration + 60)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(tmp: str, pods: tuple[Pod, Pod, Pod], args: argparse.Namespace, flow_log: str | None,
             code: Path | None = None,
             ) -> tuple[dict[str, tuple[dict[str, Any], dict[str, Any]]], dict[str, float], dict[str, Any]]:
    """One proxy's life: start it (with ``--flow-log`` if given), load it over both families, stop
    and uninstall it. Returns (direct, proxied) per family, the proxy's CPU seconds per family
    and its last status line."""
    dns_pod, client, direct = pods
    assert dns_pod.ipv6 is not None
    tag = f"b{os.getpid()}"
    pin_dir, table, label = f"/sys/fs/bpf/flowtel/dnsproxy-{tag}", f"ftdnsproxy_{tag}", f"lo:ft{tag}"[:15]
    listen = f"169.254.54.{os.getpid() % 250 + 2}"
    # A redirect of its own (mark bit, route table, rule), so that a concurrently running test
    # proxy's uninstall does not remove the bench's policy routing, nor the reverse.
    tproxy = {"tproxy_mark": 0x20, "route_table": 0xF1D1, "rule_priority": 91}
    log = Path(tmp) / "proxy.log"
    with open(log, "w") as out:
        proxy = subprocess.Popen(
            [sys.executable, "-m", "flowtel.cli", "dnsproxy",
             "--policies", f"{tmp}/policies", "--pods", f"{tmp}/pods.yaml",
             "--listen", f"{listen}:53", "--pin-dir", pin_dir, "--nft-table", table, "--address-label", label,
             "--status-interval", "0.5", "--metrics-listen=", "--health-listen=",  # no port clashes
             *(("--flow-log", flow_log) if flow_log else ()),
             *(f"--{k.replace('_', '-')}={v}" for k, v in tproxy.items())],
            # `python -m` puts the working directory first on sys.path: the code of `code` runs.
            stdout=out, stderr=subprocess.STDOUT, cwd=code or Path(__file__).resolve().parents[1])
    results, proxy_cpu = {}, {}
    try:
        deadline = time.monotonic() + 90
        # Ready means redirected: before that the client's queries would go to dnsmasq directly.
        while "dnsproxy ready" not in log.read_text():
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsproxy did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        for fam, server in (("ipv4", dns_pod.ipv4), ("ipv6", dns_pod.ipv6)):
            direct_r = _load(direct, server, args.queries, args.parallel, args.duration)
            cpu = _cpu_s(proxy.pid)
            proxied_r = _load(client, server, args.queries, args.parallel, args.duration)
            proxy_cpu[fam] = _cpu_s(proxy.pid) - cpu
            results[fam] = (direct_r, proxied_r)
        time.sleep(1.5)  # one more status line, after the load
        status_lines = [line for line in log.read_text().splitlines() if " status: " in line]
        proxy_status = json.loads(status_lines[-1].split(" status: ", 1)[1]) if status_lines else {}
        if not status_lines:
            print(log.read_text()[-3000:], file=sys.stderr)
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(15)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
        uninstall(pin_dir, nft_table=table, address_label=label, **tproxy)
    return results, proxy_cpu, proxy_status


def _family_report(args: argparse.Namespace, direct_r: dict[str, Any], proxied_r: dict[str, Any],
                   cpu_s: float) -> dict[str, Any]:
    return {
        "direct": direct_r, "proxied": proxied_r,
        "added_latency_median_ms": proxied_r["median_ms"] - direct_r["median_ms"],
        "added_latency_p99_ms": proxied_r["p99_ms"] - direct_r["p99_ms"],
        "qps_ratio_proxied_to_direct": proxied_r["qps"] / direct_r["qps"] if direct_r["qps"] else 0.0,
        # The proxy's own CPU per answered query (latency and throughput phases together):
        # steadier across runs on a shared machine than queries per second.
        "proxy_cpu_us_per_query": cpu_s / (args.queries + proxied_r["answered"]) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dnsproxy", description=__doc__)
    ap.add_argument("--queries", type=int, default=2000, help="sequential queries for the latency (default 2000)")
    ap.add_argument("--parallel", type=int, default=32, help="queries in flight for the throughput (default 32)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of parallel load per measurement (default 3)")
    ap.add_argument("--flow-log", action="store_true",
                    help="run the proxy twice in this run, without and with --flow-log (alternating, --rounds "
                         "times), and report the flow log's cost as ratios")
    ap.add_argument("--rounds", type=int, default=2, help="with --flow-log or --baseline: pairs of runs (default 2)")
    ap.add_argument("--baseline", metavar="REF",
                    help="also run git revision REF's proxy, alternating with this tree's (--rounds pairs), and "
                         "report this tree's queries/s and CPU per query relative to REF's")
    args = ap.parse_args(argv)
    if args.baseline and args.flow_log:
        ap.error("--baseline and --flow-log are separate comparisons: pass one")
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp, Testbed() as tb:
        pods = tuple(tb.add_pod(n, ipv6=True) for n in ("dns", "client", "direct"))
        dns_pod = pods[0]
        tb.start_dnsmasq(dns_pod, hosts={"api.bench.test": ["192.0.2.10", "2001:db8::10"]})
        (Path(tmp) / "policies").mkdir()
        (Path(tmp) / "policies" / "bench.yaml").write_text(POLICY)
        (Path(tmp) / "pods.yaml").write_text(yaml.safe_dump({"pods": [
            {"name": p.name, "namespace": "default", "ips": [p.ipv4, p.ipv6], "labels": {"app": p.name}}
            for p in pods]}))
        try:
            if args.baseline:
                base_dir = Path(tmp) / "baseline"
                base_dir.mkdir()
                archive = subprocess.run(["git", "-C", str(repo), "archive", args.baseline], check=True,
                                         capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(base_dir)], input=archive, check=True)
                runs = {"baseline": [], "current": []}
                for _ in range(args.rounds):
                    for mode, code in (("baseline", base_dir), ("current", None)):
                        runs[mode].append(_measure(tmp, pods, args, None, code))  # type: ignore[arg-type]
            elif not args.flow_log:
                results, proxy_cpu, proxy_status = _measure(tmp, pods, args, None)  # type: ignore[arg-type]
            else:
                runs: dict[str, list[Any]] = {"off": [], "on": []}
                for _ in range(args.rounds):
                    for mode in ("off", "on"):
                        path = f"{tmp}/flows.log" if mode == "on" else None
                        runs[mode].append(_measure(tmp, pods, args, path))  # type: ignore[arg-type]
                        if path:
                            runs[mode][-1][2]["flow_log_lines"] = sum(1 for _ in open(path))
                            os.unlink(path)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
    report: dict[str, Any] = {"queries": args.queries, "parallel": args.parallel, "duration_s": args.duration}
    med = lambda xs: xs[len(xs) // 2]  # noqa: E731
    if args.baseline:
        report["baseline"] = args.baseline
        for fam in ("ipv4", "ipv6"):
            per = {mode: [_family_report(args, *r[0][fam], r[1][fam]) for r in runs[mode]] for mode in runs}
            qps = {mode: sorted(f["proxied"]["qps"] for f in per[mode]) for mode in per}
            direct = {mode: sorted(f["direct"]["qps"] for f in per[mode]) for mode in per}
            cpu = {mode: sorted(f["proxy_cpu_us_per_query"] for f in per[mode]) for mode in per}
            lat = {mode: sorted(f["added_latency_median_ms"] for f in per[mode]) for mode in per}
            report[fam] = {
                "qps": qps, "direct_qps": direct, "proxy_cpu_us_per_query": cpu, "added_latency_median_ms": lat,
                "qps_ratio_current_to_baseline": med(qps["current"]) / med(qps["baseline"]),
                "cpu_per_query_ratio_current_to_baseline": med(cpu["current"]) / med(cpu["baseline"]),
            }
        report["proxy_status"] = runs["current"][-1][2]
    elif not args.flow_log:
        for fam, (direct_r, proxied_r) in results.items():
            report[fam] = _family_report(args, direct_r, proxied_r, proxy_cpu[fam])
        report["proxy_status"] = proxy_status  # proves the client's load went through the proxy
    else:
        # Per family: proxied queries/s and proxy CPU per query, each run; the ratios compare the
        # medians of the runs with the flow log to those without, all from this one run.
        for fam in ("ipv4", "ipv6"):
            per = {mode: [_family_report(args, *r[0][fam], r[1][fam]) for r in runs[mode]] for mode in runs}
            qps = {mode: sorted(f["proxied"]["qps"] for f in per[mode]) for mode in per}
            cpu = {mode: sorted(f["proxy_cpu_us_per_query"] for f in per[mode]) for mode in per}
            lat = {mode: sorted(f["added_latency_median_ms"] for f in per[mode]) for mode in per}
            report[fam] = {
                "qps": qps, "proxy_cpu_us_per_query": cpu, "added_latency_median_ms": lat,
                "qps_ratio_flow_log_to_none": med(qps["on"]) / med(qps["off"]),
                "cpu_per_query_ratio_flow_log_to_none": med(cpu["on"]) / med(cpu["off"]),
                "cpu_us_per_query_added_by_flow_log": med(cpu["on"]) - med(cpu["off"]),
            }
        report["proxy_status_with_flow_log"] = runs["on"][-1][2]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
