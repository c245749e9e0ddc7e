"""``flowtel demo``: the agent on throwaway network-namespace pods with generated traffic.

Three pods (client, server, dns) on a quiet testbed; the agent attaches to their host-side
veths and prints live flows, both ends named by k8sattributes from a static file (there is
no API server here) as they would be in a cluster: shop/frontend-…, shop/payments-0,
kube-system/coredns-…. At the end the summary compares what flowtel counted with
the kernel's own interface counters, so a newcomer sees both the output and its accuracy.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from flowtel import gcpolicy
from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.registry import factories_by_kind
from flowtel.errors import UsageError

try:
    # The testbed is test tooling beside the product package, in a source checkout only.
    from testbed import LinkStats, Pod, Testbed, send_ping, send_tcp, send_udp
except ModuleNotFoundError as exc:
    if exc.name != "testbed":
        raise
    raise UsageError("the demo builds its pods with the repository's testbed (test tooling, not installed "
                     "with flowtel): run `make demo` in a checkout of the source") from None

log = logging.getLogger("flowtel.demo")

TCP_PORT = 8080
UDP_PORT = 9000
CLOSED_PORT = 9009  # nothing listens: the server's kernel drops it (NO_SOCKET), a real drop to show


def _traffic(client: Pod, server: Pod, dns: Pod, stop: threading.Event) -> dict[str, int]:
    """One round a second of TCP, UDP (one to a closed port), DNS and ping from the client;
    returns what was sent."""
    sent: dict[str, int] = defaultdict(int)
    round_no = 0
    while not stop.is_set():
        round_no += 1
        started = time.monotonic()
        try:
            send_tcp(client, server.ipv4, TCP_PORT, 64 * 1024 * (1 + round_no % 4))
            sent["tcp connections"] += 1
            send_udp(client, server.ipv4, UDP_PORT, 5, 200, interval=0.01)
            sent["udp datagrams"] += 5
            send_udp(client, server.ipv4, CLOSED_PORT, 1, 64)
            sent["datagrams to a closed port"] += 1
            for name in ("server.demo.local", "nope.demo.local"):
                client.exec(["dig", "+short", "+tries=1", "+time=1", f"@{dns.ipv4}", name], check=False)
                sent["dns queries"] += 1
            send_ping(client, server.ipv4, 2, interval=0.1)
            sent["pings"] += 2
        except Exception as exc:  # the demo keeps going; the summary shows what was sent
            if not stop.is_set():
                log.warning("traffic round %d failed: %s", round_no, exc)
        # A round a second from the start of one to the next, not a second between rounds: on
        # a loaded machine a round alone takes seconds, and a short demo would show one round.
        stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))
    return sent


def _wait_quiet(bed: Testbed, pods: list[Pod], *, still: float = 0.5, timeout: float = 10.0) -> None:
    """Return once no pod's veth counters moved for ``still`` seconds (or after ``timeout``: the
    summary then shows the difference rather than the demo hanging)."""
    deadline = time.monotonic() + timeout
    last = {p.name: bed.link_stats(p) for p in pods}
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < still and time.monotonic() < deadline:
        time.sleep(0.1)
        now = {p.name: bed.link_stats(p) for p in pods}
        if now != last:
            last, quiet_since = now, time.monotonic()


def _summarise(flow_log: Path, pods: list[Pod], before: dict[str, LinkStats], after: dict[str, LinkStats], sent: dict[str, int]) -> str:
    # Totals per host-side interface and direction, from flowtel's own output file.
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    flows: dict[tuple[str, str, str], int] = defaultdict(int)
    names = {p.ipv4: p.name for p in pods}
    records = 0
    for path in sorted(flow_log.parent.glob(flow_log.name + "*")):
        for line in path.read_text().splitlines():
            env = json.loads(line)
            flow = env.get("flow")
            if not flow:
                continue
            records += 1
            ext = flow.get("extensions", {}).get("value", {})  # a google.protobuf.Struct in an Any
            if "tcp_event" in ext or flow.get("verdict") != "FORWARDED":
                continue  # socket events and drops are not the forwarded traffic the kernel counts
            iface = flow.get("interface", {}).get("name", "")
            t = totals[(iface, flow.get("traffic_direction", ""))]
            t[0] += int(ext.get("packets", 0))
            t[1] += int(ext.get("bytes", 0))
            if flow.get("traffic_direction") == "EGRESS":  # each flow once: on its sender's veth
                l4 = next(iter(flow.get("l4", {"other": {}})), "other")
                port = flow.get("l4", {}).get(l4, {}).get("destination_port", "")
                ip = flow.get("IP", {})
                src, dst = names.get(ip.get("source"), "-"), names.get(ip.get("destination"), "-")
                flows[(src, dst, f"{l4}/{port}" if port else l4)] += int(ext.get("bytes", 0))

    lines = ["", "flowtel demo summary", "====================", f"flow records written: {records} ({flow_log})"]
    lines.append("traffic generated: " + ", ".join(f"{v} {k}" for k, v in sorted(sent.items())) or "none")
    lines.append("")
    lines.append(f"{'pod':<8} {'veth':<14} {'direction':<9} {'flowtel pkts':>12} {'kernel pkts':>11} {'flowtel bytes':>13} {'kernel bytes':>12}")
    exact = True
    for pod in pods:
        delta = after[pod.name] - before[pod.name]
        # Host-side rx is what the pod sent (EGRESS); tx is what it received (INGRESS).
        for direction, kp, kb in (("EGRESS", delta.rx_packets, delta.rx_bytes), ("INGRESS", delta.tx_packets, delta.tx_bytes)):
            fp, fb = totals[(pod.host_ifname, direction)]
            exact &= fp == kp and fb == kb
            lines.append(f"{pod.name:<8} {pod.host_ifname:<14} {direction:<9} {fp:>12} {kp:>11} {fb:>13} {kb:>12}")
    lines.append("")
    lines.append("counts equal the kernel's `ip -s link` counters exactly" if exact else "WARNING: counts differ from the kernel's counters")
    lines.append("")
    lines.append("top flows by bytes (sender's veth):")
    for (src, dst, l4), nbytes in sorted(flows.items(), key=lambda kv: -kv[1])[:6]:
        lines.append(f"  {src:>8} -> {dst:<8} {l4:<10} {nbytes:>10} bytes")
    return "\n".join(lines)


def _write_endpoints(path: Path, client: Pod, server: Pod, dns: Pod) -> None:
    """Who the demo pods are, for k8sattributes' static source: there is no API server here."""
    path.write_text(f"""# k8sattributes static metadata for the demo pods (see processors/k8sattributes/README.md)
pods:
  - name: frontend-6d4b9c-x2k8p
    namespace: shop
    ips: [{client.ipv4}]
    labels: {{app: frontend, pod-template-hash: 6d4b9c}}
    workloads: [{{kind: Deployment, name: frontend}}, {{kind: ReplicaSet, name: frontend-6d4b9c}}]
  - name: payments-0
    namespace: shop
    ips: [{server.ipv4}]
    labels: {{app: payments}}
    workloads: [{{kind: StatefulSet, name: payments}}]
  - name: coredns-5d78c9-q7w2e
    namespace: kube-system
    ips: [{dns.ipv4}]
    labels: {{k8s-app: kube-dns, pod-template-hash: 5d78c9}}
    workloads: [{{kind: Deployment, name: coredns}}, {{kind: ReplicaSet, name: coredns-5d78c9}}]
namespaces:
  - {{name: shop, labels: {{kubernetes.io/metadata.name: shop}}}}
  - {{name: kube-system, labels: {{kubernetes.io/metadata.name: kube-system}}}}
""")


def run_demo(*, duration: float = 60.0, interval: float = 2.0) -> int:
    removed = Testbed.cleanup_stale()
    if removed:
        log.info("removed leftovers of an earlier run: %s", ", ".join(removed))
    workdir = Path(tempfile.mkdtemp(prefix="flowtel-demo-"))
    flow_log = workdir / "flows.log"
    with Testbed() as bed:
        client, server, dns = (bed.add_pod(n) for n in ("client", "server", "dns"))
        bed.start_tcp_sink(server, TCP_PORT)
        bed.start_udp_sink(server, UDP_PORT)
        bed.start_dnsmasq(dns, hosts={"server.demo.local": [server.ipv4], "dns.demo.local": [dns.ipv4]})
        print(f"pods: client {client.ipv4}, server {server.ipv4} (tcp/{TCP_PORT}, udp/{UDP_PORT}), dns {dns.ipv4} (dnsmasq)", flush=True)
        endpoints = workdir / "endpoints.yaml"
        _write_endpoints(endpoints, client, server, dns)
        config = parse_config(
            {
                "receivers": {"ebpf": {"interfaces": [bed.interface_glob], "collection_interval": interval}},
                "processors": {"k8sattributes": {"source": "static", "static": {"path": str(endpoints)}}},
                "exporters": {"console": {}, "file": {"path": str(flow_log)}},
                "service": {"pipelines": {"logs": {"receivers": ["ebpf"], "processors": ["k8sattributes"],
                                                   "exporters": ["console", "file"]}}},
            },
            "<demo>", factories=factories_by_kind())
        service = Service(config, node_name=os.environ.get("NODE_NAME") or "demo-node")
        pods = [client, server, dns]
        before = {p.name: bed.link_stats(p) for p in pods}
        stop = threading.Event()
        sent: dict[str, int] = {}
        traffic = threading.Thread(target=lambda: sent.update(_traffic(client, server, dns, stop)), name="demo-traffic", daemon=True)

        def stop_traffic() -> None:
            stop.set()
            if traffic.ident is not None:
                traffic.join(30)
            # The programs must see the last frames before they detach, or the summary differs
            # from the kernel's counters: a connection's last ACK, a DNS answer that came after
            # dig gave up (and the ICMP error for it). Wait until the veths' counters are still.
            _wait_quiet(bed, pods)

        def after_start() -> None:
            gcpolicy.settle()  # the agent's GC settings, as `flowtel run` applies them
            traffic.start()

        # Traffic starts once the programs are attached, and stops before they detach.
        service.run_until_signal(duration=duration, after_start=after_start, before_shutdown=stop_traffic)
        after = {p.name: bed.link_stats(p) for p in pods}
        print(_summarise(flow_log, pods, before, after, sent), flush=True)
    sys.stdout.flush()
    return 0
