"""k8sattributes: lookups per second and resident memory with 1k, 10k and 50k pods cached.

Each size runs in a fresh interpreter (resident memory never shrinks back, so sizes must
not share a process), against the stand-in API server in yet another process (its own
copy of every object must not count). The agent side is the real thing: the official
client lists and watches through HTTP, informers strip and index, then ``process`` names
both ends of synthetic flows.

Reported per size:

- ``sync s``: start to fully listed (pages of 500, as configured by default);
- ``RSS MB``: resident memory added by the synced caches, after a GC (the interpreter, the
  client's modules and validators are loaded by a warm-up run first and not counted);
- ``+views MB``: the same once every pod's endpoint view is built (each pod looked up once);
- ``lookups/s cold``: one lookup per pod, each building that pod's view;
- ``lookups/s warm``: the same addresses again (the steady state);
- ``flows/s``: ``process`` on batches of 10k flows, pod → pod (60 %), pod → ClusterIP
  (20 %) and pod → internet (20 %): two lookups and two endpoints per flow.

Run with ``make bench`` or ``python -m bench.k8sattributes [--sizes 1000,10000]``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

from bench.kubeapi import rss_mb, settle, start_server

PODS_PER_NODE = 100
PODS_PER_REPLICASET = 5
NAMESPACES = 50
FLOWS_PER_BATCH = 10_000
WARM_BATCHES = 10


def _pod_ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def _serve(pods: int, conn: Any) -> None:
    """Child process: the API server with ``pods`` pods (plus their nodes, ReplicaSets, services)."""
    from tests.kubeapi import FakeApiServer
    from tests.kubeapi import objects as o

    server = FakeApiServer(bookmark_interval=30).start()
    for n in range(NAMESPACES):
        server.create("namespaces", o.namespace(f"ns-{n}", {"team": f"team-{n % 7}"}))
    for n in range(max(1, pods // PODS_PER_NODE)):
        server.create("nodes", o.node(f"node-{n}", internal_ip=f"192.168.{n >> 8}.{n & 255}"))
    for r in range(max(1, pods // PODS_PER_REPLICASET)):
        ns = f"ns-{r % NAMESPACES}"
        server.create("replicasets", o.replicaset(f"app{r}-5d8f7c", ns, deployment=f"app{r}"))
        if r % 2 == 0:
            server.create("services", o.service(f"app{r}", ns, cluster_ip=f"172.{16 + (r >> 16)}.{(r >> 8) & 255}.{r & 255}"))
    for i in range(pods):
        r = i // PODS_PER_REPLICASET
        ns = f"ns-{r % NAMESPACES}"
        server.create("pods", o.pod(f"app{r}-5d8f7c-{i:05d}", ns, ip=_pod_ip(i), node=f"node-{i // PODS_PER_NODE}",
                                    labels={"app": f"app{r}", "pod-template-hash": "5d8f7c", "version": "v1"},
                                    owner=("ReplicaSet", f"app{r}-5d8f7c")))
    conn.send(server.url)
    conn.recv()  # until the parent is done
    server.stop()


def measure(pods: int) -> dict[str, float]:
    """One size, in this process (run it in a fresh one)."""
    from flowtel.component import CreateSettings, Telemetry
    from flowtel.records import Flow, Verdict
    from processors.k8sattributes.config import K8sAttributesConfig
    from processors.k8sattributes.kube_source import KubeSource
    from processors.k8sattributes.processor import K8sAttributesProcessor

    def processor(kubeconfig: str) -> K8sAttributesProcessor:
        cfg = K8sAttributesConfig.model_validate({"auth_type": "kubeConfig", "kubeconfig": kubeconfig,
                                                  "initial_sync_timeout": "10m"})
        return K8sAttributesProcessor(CreateSettings("k8sattributes", "node-0", Telemetry()), cfg)

    # A first run against an empty cluster loads the client's modules and builds its
    # validators: the baseline must include them, they are not the caches' cost.
    proc, conn, kubeconfig = start_server(_serve, 0)
    warmup = processor(kubeconfig)
    warmup.start()
    warmup.shutdown()
    conn.send("done")
    proc.join(30)
    os.unlink(kubeconfig)
    del warmup

    proc, conn, kubeconfig = start_server(_serve, pods)
    p = processor(kubeconfig)
    settle()
    rss_before = rss_mb()
    started = time.perf_counter()
    p.start()
    sync_s = time.perf_counter() - started
    settle()
    rss_synced = rss_mb()
    source = p.source
    assert isinstance(source, KubeSource)

    now = time.time()
    ips = [_pod_ip(i) for i in range(pods)]
    t = time.perf_counter()
    for ip in ips:  # cold: each pod's view is built on its first lookup
        source.lookup(ip, now)
    cold = pods / (time.perf_counter() - t)
    settle()
    rss_views = rss_mb()
    t = time.perf_counter()
    for _ in range(3):
        for ip in ips:
            source.lookup(ip, now)
    warm_lookups = 3 * pods / (time.perf_counter() - t)

    rng = random.Random(1)
    now_ns = time.time_ns()
    batches = []
    for _ in range(WARM_BATCHES):
        b = []
        for _ in range(FLOWS_PER_BATCH):
            roll = rng.random()
            if roll < 0.6:
                dst = ips[rng.randrange(pods)]
            elif roll < 0.8:
                r = rng.randrange(0, max(1, pods // PODS_PER_REPLICASET), 2)
                dst = f"172.{16 + (r >> 16)}.{(r >> 8) & 255}.{r & 255}"
            else:
                dst = f"203.0.{rng.randrange(256)}.{rng.randrange(256)}"
            b.append(Flow(now_ns, "node-0", Verdict.FORWARDED, 4, ips[rng.randrange(pods)], dst, 6, 40000, 80))
        batches.append(b)
    t = time.perf_counter()
    for b in batches:
        p.process(b)
    flows = WARM_BATCHES * FLOWS_PER_BATCH / (time.perf_counter() - t)
    gauges = {k[1]: v for k, v in p.settings.telemetry.snapshot().items() if k[1].endswith("_cached")}
    p.shutdown()
    conn.send("done")
    proc.join(30)
    os.unlink(kubeconfig)
    return {
        "pods": pods,
        "sync_s": sync_s,
        "rss_synced_mb": rss_synced - rss_before,
        "rss_with_views_mb": rss_views - rss_before,
        "lookups_per_s_cold": cold,
        "lookups_per_s_warm": warm_lookups,
        "flows_per_s": flows,
        "pods_cached": gauges.get("pods_cached", 0),
        "views_cached": gauges.get("endpoint_views_cached", 0),
    }


def run(sizes: tuple[int, ...] = (1_000, 10_000, 50_000)) -> list[dict[str, float]]:
    results = []
    for n in sizes:
        out = subprocess.run([sys.executable, "-m", "bench.k8sattributes", "--child", str(n)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def report(results: list[dict[str, float]]) -> str:
    lines = [f"{'pods':>7} {'sync s':>7} {'RSS MB':>7} {'+views MB':>9} {'KB/pod':>7} "
             f"{'lookups/s cold':>14} {'lookups/s warm':>14} {'flows/s':>9}"]
    for r in results:
        per_pod = r["rss_with_views_mb"] * 1024 / r["pods"]
        lines.append(f"{int(r['pods']):>7} {r['sync_s']:>7.2f} {r['rss_synced_mb']:>7.1f} {r['rss_with_views_mb']:>9.1f} "
                     f"{per_pod:>7.2f} {r['lookups_per_s_cold']:>14,.0f} {r['lookups_per_s_warm']:>14,.0f} "
                     f"{r['flows_per_s']:>9,.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="comma-separated pod counts")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child)), flush=True)
        return 0
    print(report(run(tuple(int(x) for x in args.sizes.split(",")))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
