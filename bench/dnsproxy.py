"""Proxy throughput and added latency (issue 8): ``python -m bench.dnsproxy`` (root).

A throwaway testbed: dnsmasq in a "dns" pod, a policed "client" pod whose queries go through
`flowtel dnsproxy`, an unpoliced "direct" pod asking dnsmasq itself (all dual-stack). The
same load runs from both in the same run, over IPv4 and over IPv6, so the difference is what
the proxy adds: sequential queries give the latency (median, p99), parallel sockets (each
keeping one query in flight for ``--duration`` seconds) the queries per second, and the
proxy's CPU time over its load (from /proc) the CPU per query, which varies less than
queries per second on a shared machine. The proxy runs as deployed by default: no
``--upstream``, each query forwarded to the resolver the client asked (read from the
transparent socket). Not a test: numbers.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dnsproxy", description=__doc__)
    ap.add_argument("--queries", type=int, default=2000, help="sequential queries for the latency (default 2000)")
    ap.add_argument("--parallel", type=int, default=32, help="queries in flight for the throughput (default 32)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of parallel load per measurement (default 3)")
    args = ap.parse_args(argv)
    tag = f"b{os.getpid()}"
    pin_dir, table, label = f"/sys/fs/bpf/flowtel/dnsproxy-{tag}", f"ftdnsproxy_{tag}", f"lo:ft{tag}"[:15]
    listen = f"169.254.54.{os.getpid() % 250 + 2}"
    # A redirect of its own (mark bit, route table, rule), so that a concurrently running test
    # proxy's uninstall does not remove the bench's policy routing, nor the reverse.
    tproxy = {"tproxy_mark": 0x20, "route_table": 0xF1D1, "rule_priority": 91}
    with tempfile.TemporaryDirectory() as tmp, Testbed() as tb:
        dns_pod, client, direct = (tb.add_pod(n, ipv6=True) for n in ("dns", "client", "direct"))
        assert dns_pod.ipv6 is not None
        tb.start_dnsmasq(dns_pod, hosts={"api.bench.test": ["192.0.2.10", "2001:db8::10"]})
        (Path(tmp) / "policies").mkdir()
        (Path(tmp) / "policies" / "bench.yaml").write_text(POLICY)
        (Path(tmp) / "pods.yaml").write_text(yaml.safe_dump({"pods": [
            {"name": p.name, "namespace": "default", "ips": [p.ipv4, p.ipv6], "labels": {"app": p.name}}
            for p in (dns_pod, client, direct)]}))
        log = Path(tmp) / "proxy.log"
        with open(log, "w") as out:
            proxy = subprocess.Popen(
                [sys.executable, "-m", "flowtel.cli", "dnsproxy",
                 "--policies", f"{tmp}/policies", "--pods", f"{tmp}/pods.yaml",
                 "--listen", f"{listen}:53", "--pin-dir", pin_dir, "--nft-table", table, "--address-label", label,
                 "--status-interval", "0.5", "--metrics-listen=", "--health-listen=",  # no port clashes
                 *(f"--{k.replace('_', '-')}={v}" for k, v in tproxy.items())],
                stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
        try:
            deadline = time.monotonic() + 90
            # Ready means redirected: before that the client's queries would go to dnsmasq directly.
            while "dnsproxy ready" not in log.read_text():
                if proxy.poll() is not None or time.monotonic() > deadline:
                    print(f"dnsproxy did not start: {log.read_text()[-2000:]}", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            results, proxy_cpu = {}, {}
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
    report: dict[str, Any] = {"queries": args.queries, "parallel": args.parallel, "duration_s": args.duration}
    for fam, (direct_r, proxied_r) in results.items():
        report[fam] = {
            "direct": direct_r, "proxied": proxied_r,
            "added_latency_median_ms": proxied_r["median_ms"] - direct_r["median_ms"],
            "added_latency_p99_ms": proxied_r["p99_ms"] - direct_r["p99_ms"],
            "qps_ratio_proxied_to_direct": proxied_r["qps"] / direct_r["qps"] if direct_r["qps"] else 0.0,
            # The proxy's own CPU per answered query (latency and throughput phases together):
            # steadier across runs on a shared machine than queries per second.
            "proxy_cpu_us_per_query": proxy_cpu[fam] / (args.queries + proxied_r["answered"]) * 1e6,
        }
    report["proxy_status"] = proxy_status  # proves the client's load went through the proxy
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
