"""``make bench``: every benchmark in bench/, each reporting ratios against its own baseline."""
from __future__ import annotations

import sys

from bench import bpf_runtime, datapath, dnsproxy, dnsproxy_peers, exporters, k8sattributes
from bench import linkchurn, memory, overload, startup, throughput


def main(argv: list[str]) -> int:
    """All benchmarks, or only the datapath table with ``datapath`` (``make bench BENCH=datapath``)."""
    print("== datapath cost: iperf3 TCP and UDP flood, dnsperf, connection rate between pods;"
          " ratio = observer / no observer, observer CPU in cores ==", flush=True)
    print(datapath.report(datapath.run()), flush=True)
    if argv == ["datapath"]:
        return 0
    if argv:
        print(f"unknown benchmark selection {argv!r}: use no argument (all) or 'datapath'", file=sys.stderr)
        return 2
    print("== kernel cost per run of each flowtel program (kernel.bpf_stats_enabled) ==", flush=True)
    bpf_runtime.main()
    print("== k8sattributes: lookups/s and resident memory by cached pods (bench/k8sattributes.md) ==", flush=True)
    print(k8sattributes.report(k8sattributes.run()), flush=True)
    print("== user-space throughput: records/s per core through the pipeline (ratio = stage / decode) ==", flush=True)
    print(throughput.report(throughput.run()), flush=True)
    print("== start-up: flowtel run to attached and to the first export (ratio = / bcc trivial program) ==", flush=True)
    print(startup.report(startup.run()), flush=True)
    print("== memory: agent resident memory idle and under load (ratio = / bcc trivial program) ==", flush=True)
    print(memory.report(memory.run()), flush=True)
    print("== link churn: the tc attach manager's netlink watch while 100 veth pairs/s it does not match"
          " come and go (cores; ratio = / the 0.05-core agent target) ==", flush=True)
    print(linkchurn.report(linkchurn.run(rounds=3)), flush=True)
    print("== loss under overload: UDP 64 B flood + DNS query flood ==", flush=True)
    print(overload.report(overload.run()), flush=True)
    print("== metric export: series/s and cost per export cycle (ratio = / 1k series) ==", flush=True)
    print(exporters.report(exporters.run()), flush=True)
    print("== dnsproxy: queries/s and added latency (median, p99) against direct queries, same run ==", flush=True)
    dnsproxy.main([])
    print("== dnsproxy --kube: cluster-wide pods, memory and watch-event cost by pod count ==", flush=True)
    dnsproxy_peers.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
