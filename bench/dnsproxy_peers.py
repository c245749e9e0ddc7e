"""dnsproxy ``--kube`` at cluster scale: memory and the cost of following peers (issue 8).

``python -m bench.dnsproxy_peers [--sizes 10000,50000]``. No root, no kernel: the proxy's
Kubernetes side only (dnsproxy/kube.py and the policy index), against the stand-in API server
(tests/kubeapi) in another process, so its own copy of every object does not count. Each
size runs in a fresh interpreter (resident memory never shrinks back).

The cluster: 100 pods per node, ReplicaSets of 5 replicas in 50 namespaces; in each
namespace every other ReplicaSet is ``tier: web``, the rest ``tier: db``. One CiliumNetworkPolicy per namespace
polices its web pods and allows them DNS and every db pod of the namespace (``toEndpoints``,
on any node). The proxy is ``node-0``: its 100 pods, about half of them policed, each with
the addresses of its namespace's db pods in the LPM map.

Reported per size:

- ``sync s``: start to every informer listed;
- ``RSS MB``: resident memory the synced source adds (after a GC; the client's modules are
  loaded by a warm-up run first and not counted), and per pod;
- ``event ms``: a peer on another node relabelled out of the selector in the API → its
  address gone from what the selector selects (median of 5; watch + strip + index);
- ``recompute ms``: what the proxy's loop does after such an event: a PolicySet of this
  node's pods and the LPM entries of every policed pod, selections already indexed;
- ``rebuild ms``: the same from scratch: every pod of the cluster indexed anew and every
  selector resolved against every identity (what the loop would pay per event without the
  index);
- ``entries``: LPM entries (pod address, destination) this node would hold.

With ``--datapath`` (root: compiles bpf/fqdn_policy.c over throwaway pins, no filter attached)
also the kernel side of those entries, both ways in the same run:

- ``cidr full ms``: ``Datapath.sync_cidrs`` diffing the whole fqdn_cidr map, what a restarted
  proxy's first sync pays (and what every sync paid before the per-pod diff);
- ``cidr event ms``: ``Datapath.sync_cidrs`` after one of the watch events above, touching only
  the pods whose entries changed (median of 5).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from bench.kubeapi import rss_mb, settle, start_server

PODS_PER_NODE = 100
PODS_PER_REPLICASET = 5
NAMESPACES = 50
NODE = "node-0"
EVENTS = 5


def _pod_ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def _tier(replicaset: int) -> str:
    # Alternating within each namespace (ReplicaSets go round the namespaces).
    return "web" if (replicaset // NAMESPACES) % 2 == 0 else "db"


def _policy_spec() -> dict[str, Any]:
    return {"endpointSelector": {"matchLabels": {"tier": "web"}},
            "egress": [{"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system",
                                                         "k8s-app": "kube-dns"}}],
                        "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                                     "rules": {"dns": [{"matchPattern": "*"}]}}]},
                       {"toEndpoints": [{"matchLabels": {"tier": "db"}}],
                        "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}]}


def _serve(pods: int, conn: Any) -> None:
    """Child process: the API server with ``pods`` pods and one policy per namespace."""
    from tests.kubeapi import FakeApiServer
    from tests.kubeapi import objects as o

    server = FakeApiServer(bookmark_interval=30).start()
    server.create("namespaces", o.namespace("kube-system"))
    server.create("pods", o.pod("coredns-0", "kube-system", ip="10.255.0.10", node="node-1",
                                labels={"k8s-app": "kube-dns"}))
    for n in range(NAMESPACES):
        server.create("namespaces", o.namespace(f"ns-{n}", {"team": f"team-{n % 7}"}))
        if pods:
            server.create("ciliumnetworkpolicies", o.cilium_network_policy("web-egress", f"ns-{n}", spec=_policy_spec()))
    for i in range(pods):
        r = i // PODS_PER_REPLICASET
        server.create("pods", o.pod(f"app{r}-5d8f7c-{i:05d}", f"ns-{r % NAMESPACES}", ip=_pod_ip(i),
                                    node=f"node-{i // PODS_PER_NODE}", owner=("ReplicaSet", f"app{r}-5d8f7c"),
                                    labels={"app": f"app{r}", "pod-template-hash": "5d8f7c",
                                            "tier": _tier(r)}))
    conn.send(server.url)
    while True:
        msg = conn.recv()  # ("relabel", name, namespace, tier) or "done"
        if msg == "done":
            break
        _, name, namespace, tier = msg
        server.patch("pods", name, lambda p, t=tier: p["metadata"]["labels"].update(tier=t), namespace=namespace)
        conn.send("ok")
    server.stop()


def measure(pods: int, datapath: bool = False) -> dict[str, float]:
    """One size, in this process (run it in a fresh one)."""
    from dnsproxy.kube import KubeSource
    from flowtel.lib.policy import EndpointIndex, PolicySet

    def synced(kubeconfig: str, on_change: Any = None) -> tuple[KubeSource, float]:
        src = KubeSource.connect(kubeconfig, NODE, on_change=on_change)
        started = time.perf_counter()
        src.start()
        while not src.synced:
            time.sleep(0.01)
        return src, time.perf_counter() - started

    # Warm-up against an empty cluster: the client's modules and validators are no cost of the stores.
    proc, conn, kubeconfig = start_server(_serve, 0)
    warm, _ = synced(kubeconfig)
    warm.shutdown()
    conn.send("done")
    proc.join(30)
    os.unlink(kubeconfig)
    del warm

    proc, conn, kubeconfig = start_server(_serve, pods)
    settle()
    rss_before = rss_mb()
    changed = threading.Event()
    src, sync_s = synced(kubeconfig, changed.set)
    settle()
    rss = rss_mb() - rss_before

    def recompute() -> tuple[PolicySet, int]:
        state = src.state()
        ps = PolicySet(state.policies, state.pods, node=NODE, endpoints=state.endpoints)
        entries = sum(len(ps.cidr_entries(p)) * len(p.ips) for p in ps.policed_pods())
        return ps, entries

    ps, entries = recompute()  # registers the selectors, as the proxy's first round does
    t = time.perf_counter()
    ps, entries = recompute()
    recompute_ms = (time.perf_counter() - t) * 1000
    cidr = _CidrBench(ps) if datapath else None  # after the memory figure: LLVM is ~150 MB

    # From scratch: every pod of the cluster indexed and every selector resolved again.
    with src._lock:  # the bench reads the source's stores directly; the proxy never needs all pods as Pods
        everyone = [src._pod(p) for pods_of_ns in src._pods_by_namespace.values() for p in pods_of_ns.values()]
    t = time.perf_counter()
    fresh = PolicySet(ps.policies, everyone, node=NODE, endpoints=EndpointIndex(everyone))
    for p in fresh.policed_pods():
        fresh.cidr_entries(p)
    rebuild_ms = (time.perf_counter() - t) * 1000

    # Watch events: db pods of another node (ns-0) relabelled out of the selector, then back.
    sel = next(s for s in ps.endpoint_selectors() if any(r.key == "tier" for r in s.requirements)
               and ("ns-0",) in [r.values for r in s.requirements])
    remote = [i for i in range(PODS_PER_NODE, pods) if (i // PODS_PER_REPLICASET) % NAMESPACES == 0
              and _tier(i // PODS_PER_REPLICASET) == "db"][:EVENTS]
    latencies = []
    for i in remote:
        r = i // PODS_PER_REPLICASET
        name, ip = f"app{r}-5d8f7c-{i:05d}", _pod_ip(i)
        assert ip in src.endpoints.addresses(sel)
        changed.clear()
        t = time.perf_counter()
        conn.send(("relabel", name, "ns-0", "batch"))
        while ip in src.endpoints.addresses(sel):
            changed.wait(0.001)
        latencies.append((time.perf_counter() - t) * 1000)
        conn.recv()
        if cidr is not None:
            cidr.event(recompute()[0])
    src.shutdown()
    extra = cidr.finish() if cidr is not None else {}
    conn.send("done")
    proc.join(30)
    os.unlink(kubeconfig)
    return {"pods": pods, "sync_s": sync_s, "rss_mb": rss, "event_ms": statistics.median(latencies) if latencies else 0.0,
            "recompute_ms": recompute_ms, "rebuild_ms": rebuild_ms, "entries": entries,
            "identities": src.endpoints.identities(), **extra}


class _CidrBench:
    """fqdn_cidr writes of the policed pods' entries, on a real map under throwaway pins."""

    def __init__(self, ps: Any) -> None:
        from dnsproxy.datapath import Datapath

        self._pin_dir = f"/sys/fs/bpf/flowtel/bench-peers-{os.getpid()}"
        self._make = lambda: Datapath(self._pin_dir, nft_table="ftbench", address_label="lo:ftbench")
        self.datapath = self._make()
        self.datapath.sync_cidrs(self._cidrs(ps))  # fills the map, as the proxy's first round does
        self.event_ms: list[float] = []
        self._last: Any = ps

    @staticmethod
    def _cidrs(ps: Any) -> dict[str, Any]:
        return {ip: ps.cidr_entries(p) for p in ps.policed_pods() for ip in p.ips}

    def event(self, ps: Any) -> None:
        cidrs = self._cidrs(ps)  # what Runner.sync hands over: every policed pod's list
        t = time.perf_counter()
        self.datapath.sync_cidrs(cidrs)
        self.event_ms.append((time.perf_counter() - t) * 1000)
        self._last = ps

    def finish(self) -> dict[str, float]:
        import shutil

        cidrs = self._cidrs(self._last)
        fresh = self._make()  # a new process's view over the same pins: its first sync diffs it all
        try:
            t = time.perf_counter()
            fresh.sync_cidrs(cidrs)
            full_ms = (time.perf_counter() - t) * 1000
        finally:
            fresh.close()
            self.datapath.close()
            shutil.rmtree(self._pin_dir, ignore_errors=True)
        return {"cidr_full_ms": full_ms,
                "cidr_event_ms": statistics.median(self.event_ms) if self.event_ms else 0.0}


def run(sizes: tuple[int, ...] = (10_000, 50_000), datapath: bool = False) -> list[dict[str, float]]:
    results = []
    for n in sizes:
        out = subprocess.run([sys.executable, "-m", "bench.dnsproxy_peers", "--child", str(n),
                              *(("--datapath",) if datapath else ())],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def report(results: list[dict[str, float]]) -> str:
    lines = [f"{'pods':>7} {'sync s':>7} {'RSS MB':>7} {'KB/pod':>7} {'event ms':>9} {'recompute ms':>12} "
             f"{'rebuild ms':>10} {'entries':>8} {'identities':>10}"]
    for r in results:
        lines.append(f"{int(r['pods']):>7} {r['sync_s']:>7.2f} {r['rss_mb']:>7.1f} {r['rss_mb'] * 1024 / r['pods']:>7.2f} "
                     f"{r['event_ms']:>9.1f} {r['recompute_ms']:>12.1f} {r['rebuild_ms']:>10.1f} "
                     f"{int(r['entries']):>8} {int(r['identities']):>10}")
    if any("cidr_full_ms" in r for r in results):
        lines += ["", f"{'pods':>7} {'cidr full ms':>12} {'cidr event ms':>13} {'ratio':>7}"]
        for r in results:
            if "cidr_full_ms" in r:
                lines.append(f"{int(r['pods']):>7} {r['cidr_full_ms']:>12.1f} {r['cidr_event_ms']:>13.2f} "
                             f"{r['cidr_full_ms'] / max(r['cidr_event_ms'], 1e-6):>7.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000", help="comma-separated pod counts")
    parser.add_argument("--datapath", action="store_true",
                        help="also time fqdn_cidr writes on a real map (root; compiles the BPF program)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.datapath)), flush=True)
        return 0
    print(report(run(tuple(int(x) for x in args.sizes.split(",")), args.datapath)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
