"""Loss under overload: a small-packet UDP flood and a DNS query flood beyond what user space takes.

The agent runs in this process (the real ``Service``: ebpf receiver with DNS, file exporter
to a tmpfs file, 1 s collection interval), so that its kernel-side counters can be read
next to the kernel's own. Four pods: ``iperf3 -u -b 0 -l 64`` from ``client`` to ``server``,
and from ``dnsc`` two unpaced Python senders of DNS queries (raw UDP, port 53) to
``dnss`` (nothing listens there: the queries are not answered), all at once for
``--seconds``. Then traffic stops, one more interval is drained, and the bench compares:

- **agent up**: the DNS reader and the drain thread are alive, the process answered;
- **kernel counters exact**: flowtel's per-veth packet totals (the per-CPU ``iface_totals``
  map, ingress and egress hooks) against ``ip -s link`` deltas of the same host-side veths
  (rx = ingress hook, tx + tx_dropped = egress hook: tc egress runs before the veth can drop);
- **every lost DNS event counted**: packets the senders sent (each counted once, at the
  sender's host-side veth; the receiver's skips it) against DNS records read and parsed by user
  space + ``LostEvents{DNS_TCP_UNPARSED}`` in the exported output; the kernel's own
  ring counters (written, lost) beside them; the pipeline's QUEUE_FULL losses too.

Ratios: user-space share of DNS events (parsed / seen) and the flood's packet rate with
flowtel attached against the same flood without it, measured first in the same run.

Run with ``make bench`` or ``python -m bench.overload [--seconds 10]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from testbed import Pod, Testbed, require_tool

DNS_SENDER = r"""
import socket, struct, sys, time
dst, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
msgs = []
for i in range(256):
    name = b"".join(bytes([len(p)]) + p for p in (b"flood%d" % i, b"bench", b"local")) + b"\0"
    msgs.append(struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1")
sent = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for m in msgs:
        try:
            s.sendto(m, (dst, 53))
            sent += 1
        except OSError:
            pass
print(sent)
"""


def _iperf_udp(client: Pod, server_ip: str, seconds: float) -> subprocess.Popen:
    return client.popen([require_tool("iperf3"), "-c", server_ip, "-u", "-b", "0", "-l", "64", "-t", str(seconds), "-J"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _flood(bed: Testbed, pods: dict[str, Pod], seconds: float, senders: int) -> dict[str, Any]:
    iperf = _iperf_udp(pods["client"], pods["server"].ipv4, seconds)
    dns = [pods["dnsc"].popen([sys.executable, "-c", DNS_SENDER, pods["dnss"].ipv4, str(seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(senders)]
    out, _ = iperf.communicate(timeout=seconds + 60)
    r = json.loads(out)
    pps = r["end"]["sum"]["packets"] / r["end"]["sum"]["seconds"]
    sent = sum(int(p.communicate(timeout=seconds + 60)[0].strip() or 0) for p in dns)
    return {"udp_pps": pps, "dns_sent": sent}


def run(seconds: float = 10.0, senders: int = 2) -> dict[str, Any]:
    from flowtel.config import parse_config
    from flowtel.registry import factories_by_kind
    from flowtel.pipeline import Service

    res: dict[str, Any] = {"seconds": seconds}
    with Testbed() as bed, tempfile.TemporaryDirectory(prefix="flowtel-bench-overload-", dir="/dev/shm") as tmp:
        pods = {n: bed.add_pod(n) for n in ("client", "server", "dnsc", "dnss")}
        server = pods["server"].popen([require_tool("iperf3"), "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        res["baseline"] = _flood(bed, pods, seconds, senders)  # no observer
        time.sleep(1)
        flow_log = Path(tmp) / "flows.log"
        cfg = parse_config({
            "receivers": {"ebpf": {"interfaces": [bed.interface_glob], "collection_interval": "1s"}},
            "exporters": {"file": {"path": str(flow_log), "max_size_mb": 100_000}},
            "service": {"pipelines": {"logs": {"receivers": ["ebpf"], "exporters": ["file"]}}},
        }, "bench.overload", environ={}, factories=factories_by_kind())
        service = Service(cfg, node_name="bench-node")
        service.start()
        try:
            receiver: Any = service.receivers["ebpf"]
            want = {p.host_ifindex for p in pods.values()}
            while not want <= set(receiver.attach_manager.attached()):
                time.sleep(0.05)
            time.sleep(1.5)
            before_link = {n: bed.link_stats(p) for n, p in pods.items()}
            before_tot = receiver.interface_totals()
            cpu0 = time.process_time()
            res["flowtel"] = _flood(bed, pods, seconds, senders)
            res["agent_cpu_s"] = time.process_time() - cpu0
            time.sleep(2.5)  # the last interval drained, the ring read to the end
            after_link = {n: bed.link_stats(p) for n, p in pods.items()}
            after_tot = receiver.interface_totals()
            dns = receiver.dns
            res["alive"] = {"dns_reader": dns.alive, "drain_thread": receiver._thread.is_alive(),
                            "threads": threading.active_count()}
            kernel = dns.kernel_counts()
            # Since DNS is counted in the kernel (bpf/dns.h), the ring carries samples: one lost
            # or skipped costs detail, not a count.
            res["ring_written"] = kernel["SAMPLES"]
            res["ring_lost"] = kernel["SAMPLES_LOST"]
            res["ring_skipped"] = kernel["SAMPLES_SKIPPED"]
            links = {}
            for n, p in pods.items():
                d = after_link[n] - before_link[n]

                def tot(hook: int, p: Pod = p) -> int:
                    return after_tot.get((p.host_ifindex, hook), (0, 0))[0] - before_tot.get((p.host_ifindex, hook), (0, 0))[0]

                links[n] = {"ip_rx": d.rx_packets, "flowtel_ingress": tot(0), "ip_tx": d.tx_packets,
                            "ip_tx_dropped": d.tx_dropped, "ip_rx_dropped": d.rx_dropped, "flowtel_egress": tot(1)}
            res["links"] = links
        finally:
            service.shutdown()  # detaches, then reads the ring to its end
            server.kill()
        # After shutdown: a flood leaves user space behind by a whole ring's worth of records.
        res["parsed"] = dns.tracker.counts.events
        res["parse_errors"] = dns.tracker.counts.parse_errors
        res["dns_requests"] = dns.tracker.counts.requests
        res["queue_dropped"] = sum(v for (c, k), v in service.telemetry.snapshot().items() if k == "records_dropped")
        lost: dict[str, int] = {}
        with open(flow_log) as f:
            for line in f:
                if '"lost_events"' in line:
                    le = json.loads(line)["lost_events"]
                    lost[le["source"]] = lost.get(le["source"], 0) + int(le["num_events_lost"])
        res["lost_in_output"] = lost
        res["dns_flows_in_output"] = 0  # counted below without holding the file in memory
        with open(flow_log) as f:
            res["dns_flows_in_output"] = sum(1 for line in f if '"l7"' in line)
    return res


def report(r: dict[str, Any]) -> str:
    base, fl = r["baseline"], r["flowtel"]
    seen = r["ring_written"] + r["ring_lost"] + r["ring_skipped"]
    expected = fl["dns_sent"]  # once per message: at the sender's veth (the receiver's skips it)
    lost_out = r["lost_in_output"].get("DNS_TCP_UNPARSED", 0)
    queue_out = sum(v for k, v in r["lost_in_output"].items() if k.startswith("QUEUE_FULL"))
    lines = [
        f"flood {r['seconds']:.0f} s: iperf3 UDP 64 B {fl['udp_pps']:,.0f} pkts/s with flowtel vs {base['udp_pps']:,.0f} "
        f"without (ratio {fl['udp_pps'] / base['udp_pps']:.2f}); DNS queries sent {fl['dns_sent']:,} "
        f"({fl['dns_sent'] / r['seconds']:,.0f}/s; {base['dns_sent'] / r['seconds']:,.0f}/s without flowtel)",
        f"agent up: {r['alive']}; agent process CPU during the flood {r['agent_cpu_s']:.1f} s "
        f"({r['agent_cpu_s'] / r['seconds']:.2f} cores)",
        "per-veth packets  (ingress hook vs ip rx; egress hook vs ip tx + tx_dropped):",
    ]
    for n, l in r["links"].items():
        ok_in = l["flowtel_ingress"] == l["ip_rx"]
        ok_out = l["flowtel_egress"] == l["ip_tx"] + l["ip_tx_dropped"]
        lines.append(f"  {n:7} ingress {l['flowtel_ingress']:>10,} vs {l['ip_rx']:>10,} {'==' if ok_in else '!='}   "
                     f"egress {l['flowtel_egress']:>10,} vs {l['ip_tx']:>10,} + {l['ip_tx_dropped']:,} {'==' if ok_out else '!='}"
                     f"   (rx_dropped {l['ip_rx_dropped']:,})")
    lines += [
        f"DNS: sent (each counted once, at the sender's veth) = {expected:,}; seen by the tc programs (samples written + lost + "
        f"over budget) = {seen:,} (difference {expected - seen:,}: dropped by the kernel before tc, see rx/tx_dropped)",
        f"     counted as requests (kernel aggregates) {r['dns_requests']:,} {'==' if r['dns_requests'] == seen else '!='} seen; "
        f"samples written {r['ring_written']:,} = read by user space {r['parsed']:,} "
        f"{'==' if r['ring_written'] == r['parsed'] else '!='}; samples lost to a full ring {r['ring_lost']:,}, "
        f"over the sample budget {r['ring_skipped']:,} (detail only); LostEvents DNS_TCP_UNPARSED "
        f"(TCP messages not counted) {lost_out:,}",
        f"     user-space share read / seen = {r['parsed'] / max(1, seen):.2f}; parse errors {r['parse_errors']:,}",
        f"     DNS flows in output {r['dns_flows_in_output']:,}; pipeline queue drops {r['queue_dropped']:,} "
        f"(LostEvents QUEUE_FULL* in output {queue_out:,} {'==' if queue_out == r['queue_dropped'] else '!='}); other lost: "
        f"{ {k: v for k, v in r['lost_in_output'].items() if k != 'DNS_TCP_UNPARSED' and not k.startswith('QUEUE_FULL')} }",
        f"load average: {os.getloadavg()[0]:.2f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=2, help="DNS flood processes")
    args = parser.parse_args(argv)
    print(report(run(args.seconds, args.senders)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
