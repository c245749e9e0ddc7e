"""User-space throughput: records per second per core through the pipeline, for flows and DNS.

Not a test: nothing is asserted, numbers are printed. The stages are the agent's own code,
called in one thread, one interval's batch at a time, timed with ``time.thread_time`` (CPU
time of this thread, so other processes on a shared machine cost wall time, not CPU time):

- ``decode``: flows — synthetic :class:`receiver.ebpf.flowmap.RawFlow` (what a drain of the
  kernel's flow map returns) through the receiver's real conversion,
  ``EbpfReceiver._to_flows``; DNS — :class:`receiver.ebpf.dns.DnsEvent` records carrying
  real DNS wire messages (a query and its answer per exchange) through
  ``DnsTracker.process`` (wire parsing, request/response matching, flow building);
- ``+k8sattributes``: the processor with its static source (a file of pods: there is no API
  server here), naming both ends of every record;
- ``+connectors``: ``servicegraph`` (metrics flushed after every batch) and ``hubblemetrics``
  when that connector exists in this tree, each into a null consumer;
- ``+exporter``: the ``file`` exporter encoding every record as Hubble JSON, its write
  replaced by a null sink (so disk speed is not measured);
- ``+hubble``: the ``hubble`` extension's flow store (``FlowStore.add``, what the shipped
  config's ``service.extensions: [hubble]`` does with every record of the logs pipelines;
  messages are built only when a reader asks, so none here).

``--connectors shipped`` runs the connectors of ``config/flowtel.yaml`` instead (its
``hubblemetrics`` families, no ``servicegraph``): the per-record cost of the shipped agent.

The process runs with the agent's garbage-collector settings (:mod:`flowtel.gcpolicy`, what
``flowtel run`` applies once started) unless ``--gc default`` asks for CPython's defaults;
``--gc both`` measures both in the same run, interleaved per input size.

Flows are handed on in chunks of the receiver's ``DRAIN_CHUNK_RECORDS`` (8192), as its drain
does: the agent never holds more than one chunk in the pipeline, so an interval of 100,000
flows is 13 batches, not one (``--chunk 0`` measures the whole interval as one batch, which
costs ≈ 25 % more per record: a working set of ≈ 200 MB of records and lines, not the GC).

Each stage row is cumulative (decode, then decode + k8sattributes, …); its ratio is against
the ``decode`` row of the same run and size, and against the issue's target of 100,000 flow
records per second per core end to end. Medians of ``--reps`` runs per cell.

Run with ``make bench`` or ``python -m bench.throughput [--sizes 10000,100000] [--reps 5] [--gc agent|default|both]``.
"""
from __future__ import annotations

import argparse
import gc
import socket
import statistics
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

TARGET_PER_CORE = 100_000
NODE_PODS = 100  # pods on this node: one host-side veth each
CLUSTER_PODS = 1000  # pods the static source knows (remote ends)
DNS_SERVER_IP = "10.96.0.10"


class _NullConsumer:
    def __init__(self) -> None:
        self.records = 0

    def consume(self, batch: list[Any]) -> None:
        self.records += len(batch)

    def wants(self, _signal: str) -> bool:
        return True


class _Interfaces:
    """Stands in for the attach manager: ifindex → the host-side veth it would have attached."""

    def __init__(self) -> None:
        from flowtel.lib.bpf.tcattach import Interface

        self._ifaces = {100 + i: Interface(100 + i, f"lxc{i:04x}", "veth") for i in range(NODE_PODS)}

    def interface(self, ifindex: int) -> Any:
        return self._ifaces.get(ifindex)


def _pod_ip(i: int) -> str:
    return f"10.244.{i // 250}.{i % 250 + 1}"


def _write_static(path: Path) -> None:
    lines = ["pods:"]
    for i in range(CLUSTER_PODS):
        d = i // 5
        lines.append(f"  - name: app{d}-5d8f7c-{i:05d}\n    namespace: ns-{d % 20}\n    ips: [{_pod_ip(i)}]\n"
                     f"    labels: {{app: app{d}, pod-template-hash: 5d8f7c, version: v1}}\n"
                     f"    workloads: [{{kind: Deployment, name: app{d}}}, {{kind: ReplicaSet, name: app{d}-5d8f7c}}]\n"
                     f"    node: node-{i // NODE_PODS}")
    lines.append("services:\n  - {name: kube-dns, namespace: kube-system, ips: [" + DNS_SERVER_IP + "]}")
    lines.append("nodes:\n  - {name: node-0, ips: [192.168.0.10]}")
    lines.append("namespaces:")
    for n in range(20):
        lines.append(f"  - {{name: ns-{n}, labels: {{team: t{n % 7}}}}}")
    path.write_text("\n".join(lines) + "\n")


def _ip16(ip: str) -> bytes:
    return socket.inet_aton(ip) + bytes(12)


def raw_flows(n: int) -> list[Any]:
    """``n`` distinct flows as a drain returns them: 70 % TCP, 30 % UDP; 60 % pod → pod,
    20 % pod → another node's pod, 20 % pod → internet; both hooks."""
    from receiver.ebpf.flowmap import RawFlow

    now = time.monotonic_ns()
    out = []
    for i in range(n):
        local = i % NODE_PODS
        kind = i % 5
        if kind < 3:
            dst = _pod_ip((i * 7 + 3) % NODE_PODS)
        elif kind == 3:
            dst = _pod_ip(NODE_PODS + (i * 13) % (CLUSTER_PODS - NODE_PODS))
        else:
            dst = f"52.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        tcp = i % 10 < 7
        out.append(RawFlow(
            saddr=_ip16(_pod_ip(local)), daddr=_ip16(dst), ifindex=100 + local,
            sport=32768 + (i // NODE_PODS) % 28000, dport=(443, 80, 8080, 5432, 6379)[i % 5],
            ethertype=0x0800, family=4, protocol=6 if tcp else 17, hook=i & 1,
            packets=10 + i % 50, bytes=1500 * (10 + i % 50), first_ns=now - 5_000_000_000, last_ns=now,
            syn=1 if tcp else 0, synack=1 if tcp else 0, fin=1 if tcp and i % 3 == 0 else 0, rst=0,
            tcp_flags=0x1B if tcp else 0,
        ))
    return out


def _name(qname: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\0"


def dns_query(txid: int, qname: str) -> bytes:
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + _name(qname) + struct.pack("!HH", 1, 1)


def dns_answer(txid: int, qname: str, ip: str) -> bytes:
    return (struct.pack("!HHHHHH", txid, 0x8180, 1, 1, 0, 0) + _name(qname) + struct.pack("!HH", 1, 1)
            + struct.pack("!HHHIH", 0xC00C, 1, 1, 30, 4) + socket.inet_aton(ip))


def dns_events(n: int) -> list[Any]:
    """``n`` DNS events: ``n // 2`` exchanges (query from a pod's veth, answer back to it)."""
    from receiver.ebpf.dns import DnsEvent

    now = time.monotonic_ns()
    server = _ip16(DNS_SERVER_IP)
    out = []
    for x in range(n // 2):
        local = x % NODE_PODS
        client = _ip16(_pod_ip(local))
        sport = 1024 + (x // NODE_PODS) % 60000
        txid = x & 0xFFFF
        qname = f"svc{x % 5000}.ns-{x % 20}.svc.cluster.local"
        q = dns_query(txid, qname)
        a = dns_answer(txid, qname, _pod_ip(x % CLUSTER_PODS))
        ts = now + x * 1000
        # As the kernel samples them (bpf/dns.h): counted there already, name and key given.
        name_hash = hash(qname) & 0xFFFF_FFFF_FFFF_FFFF
        out.append(DnsEvent(ts, 100 + local, 0, 4, 17, client, server, sport, 53, len(q), q, name_hash=name_hash,
                            qtype=1, server_port=53))
        out.append(DnsEvent(ts + 300_000, 100 + local, 1, 4, 17, server, client, 53, sport, len(a), a,
                            latency_ns=300_000, name_hash=name_hash, qtype=1, server_port=53, is_response=1))
    return out


@dataclass
class Stage:
    name: str
    fn: Callable[[list[Any]], list[Any]]


def _shipped_metrics() -> list[str]:
    import yaml

    import flowtel

    root = Path(flowtel.__file__).resolve().parent.parent  # the tree under test (this file may be a copy)
    config = yaml.safe_load((root / "config" / "flowtel.yaml").read_text())
    return list(config["connectors"]["hubblemetrics"]["metrics"])


BENCH_METRICS = ["flow", "tcp", "drop:sourceContext=pod", "dns:query;sourceContext=pod;destinationContext=pod"]


def _build(workdir: Path, connector_set: str = "bench") -> tuple[list[Stage], list[str], list[Any]]:
    """The stages after decode, each built by its factory from a config, and notes on what is absent."""
    from flowtel.component import CreateSettings, Telemetry

    telemetry = Telemetry()
    notes: list[str] = []

    def settings(cid: str) -> CreateSettings:
        return CreateSettings(id=cid, node_name="node-0", telemetry=telemetry)

    stages: list[Stage] = []
    components: list[Any] = []
    try:
        from processors.k8sattributes.factory import FACTORY as k8s
    except ImportError as exc:
        notes.append(f"k8sattributes: not in this tree ({exc}); stage skipped")
    else:
        static = workdir / "endpoints.yaml"
        _write_static(static)
        proc = k8s.create(settings("k8sattributes"),
                          k8s.config_class.model_validate({"source": "static", "static": {"path": str(static)}}))
        proc.start()
        components.append(proc)
        stages.append(Stage("+k8sattributes", proc.process))

    connectors: list[Any] = []
    from connectors.servicegraph.factory import FACTORY as sg

    if connector_set == "bench":
        connectors.append(sg.create(settings("servicegraph"),
                                    sg.config_class.model_validate({"metrics_flush_interval": 0}), _NullConsumer()))
    try:
        from connectors.hubblemetrics.factory import FACTORY as hm  # type: ignore[import-not-found]
    except ImportError:
        notes.append("hubblemetrics: connector not in this tree yet; +connectors is servicegraph only")
    else:
        try:
            metrics = BENCH_METRICS if connector_set == "bench" else _shipped_metrics()
            cfg = hm.config_class.model_validate({"metrics": metrics})
            connectors.append(hm.create(settings("hubblemetrics"), cfg, _NullConsumer()))
        except Exception as exc:  # a connector under construction must not stop the bench
            notes.append(f"hubblemetrics: could not be built ({exc.__class__.__name__}: {exc}); skipped")
    for c in connectors:
        c.start()
    components.extend(connectors)

    def connect(batch: list[Any]) -> list[Any]:
        for c in connectors:
            c.consume(batch)
        return batch

    stages.append(Stage("+connectors", connect))

    from exporters.file.factory import FACTORY as fe

    exporter = fe.create(settings("file"), fe.config_class.model_validate({"path": str(workdir / "flows.log")}))
    exporter._file.write_lines = lambda lines: None  # the null sink: encoding is measured, the disk is not

    def export(batch: list[Any]) -> list[Any]:
        exporter.consume(batch)
        return batch

    stages.append(Stage("+exporter", export))
    components.append(exporter)

    from extensions.hubble.factory import FACTORY as hx

    hubble = hx.create(settings("hubble"), hx.config_class.model_validate({}))  # not started: no server

    def store(batch: list[Any]) -> list[Any]:
        hubble.consume(batch)
        return batch

    stages.append(Stage("+hubble", store))
    return stages, notes, components


def _time_chain(make_input: Callable[[], list[Any]], decode: Callable[[list[Any]], list[Any]],
                stages: list[Stage], upto: int, chunk: int = 0) -> tuple[float, int]:
    """CPU seconds of this thread for decode + the first ``upto`` stages on one interval's
    input, handed on ``chunk`` entries at a time as the receiver's drain does (0: at once)."""
    raw = make_input()
    gc.collect()
    step = chunk if chunk > 0 else max(len(raw), 1)
    n = 0
    t0 = time.thread_time()
    for at in range(0, len(raw), step):
        batch = decode(raw[at:at + step])
        for stage in stages[:upto]:
            batch = stage.fn(batch)
        n += len(batch)
        del batch  # one chunk in flight, as in the agent (receiver.ebpf waits for each to be consumed)
    return time.thread_time() - t0, n


@dataclass
class Cell:
    kind: str  # flows | dns
    size: int
    stage: str
    records: int
    per_s: float  # median records per CPU-second
    gc: str = "agent"  # the GC settings it ran with: "agent" (flowtel.gcpolicy) or "default" (CPython's)
    chunk: int = 0  # records handed on at a time (0: the interval at once)


_DEFAULT_GC = gc.get_threshold()


def _set_gc(mode: str) -> None:
    if mode == "agent":
        from flowtel import gcpolicy

        gcpolicy.settle()
    else:
        gc.unfreeze()
        gc.set_threshold(*_DEFAULT_GC)


def run(sizes: tuple[int, ...] = (10_000, 100_000), reps: int = 5,
        gc_modes: tuple[str, ...] = ("agent",), connector_set: str = "bench",
        kinds: tuple[str, ...] = ("flows", "dns"), chunk: int | None = None) -> tuple[list[Cell], list[str]]:
    from flowtel.component import CreateSettings, Telemetry
    from receiver.ebpf.config import EbpfReceiverConfig
    from receiver.ebpf.dns import DnsTracker
    from receiver.ebpf.receiver import EbpfReceiver, _monotonic_to_wall_offset

    if chunk is None:
        chunk = _drain_chunk()
    workdir = Path(tempfile.mkdtemp(prefix="flowtel-bench-"))
    stages, notes, components = _build(workdir, connector_set)
    ifaces = _Interfaces()
    receiver = EbpfReceiver(CreateSettings("ebpf", "node-0", Telemetry()), EbpfReceiverConfig(), _NullConsumer())
    receiver._attach = ifaces  # what start() would have set; _to_flows only asks it for interfaces
    cells: list[Cell] = []
    for kind in kinds:
        for size in sizes:
            step = chunk if kind == "flows" else 0  # DNS events: one tracker per batch, so one batch
            if kind == "flows":
                inputs = raw_flows(size)
                make_input = lambda inputs=inputs: list(inputs)  # noqa: E731
                decode = receiver._to_flows
            else:
                def make_input(size: int = size) -> list[Any]:
                    return dns_events(size)

                def decode(events: list[Any]) -> list[Any]:
                    tracker = DnsTracker(node_name="node-0", timeout_ns=2_000_000_000,
                                         interface_of=ifaces.interface, wall_offset_ns=_monotonic_to_wall_offset)
                    return tracker.process(events)
            # Warm-up (caches of addresses and endpoint views fill as in a running agent).
            _time_chain(make_input, decode, stages, len(stages), step)
            for mode in gc_modes:
                _set_gc(mode)
                for upto in range(len(stages) + 1):
                    times = []
                    n = 0
                    for _ in range(reps):
                        t, n = _time_chain(make_input, decode, stages, upto, step)
                        times.append(t)
                    med = statistics.median(times)
                    cells.append(Cell(kind, size, "decode" if upto == 0 else stages[upto - 1].name, n,
                                      n / med if med > 0 else float("inf"), mode, step))
    for c in components:
        c.shutdown()
    return cells, notes


def _drain_chunk() -> int:
    """What the receiver hands the pipeline at a time in the tree under test (0 in a tree
    whose drain hands on the whole interval)."""
    try:
        from flowtel.lib.bpf.doublebuffer import DRAIN_CHUNK_RECORDS
    except ImportError:
        return 0
    return int(DRAIN_CHUNK_RECORDS)


def report(result: tuple[list[Cell], list[str]]) -> str:
    cells, notes = result
    lines = [f"{'input':6} {'records/interval':>16} {'chunk':>6} {'gc':7} {'stage':15} {'records/s/core':>15} "
             f"{'vs decode':>10} {'vs 100k target':>15}"]
    base: dict[tuple[str, int, str], float] = {}
    for c in cells:
        if c.stage == "decode":
            base[(c.kind, c.size, c.gc)] = c.per_s
        lines.append(f"{c.kind:6} {c.records:16,} {c.chunk or '-':>6} {c.gc:7} {c.stage:15} {c.per_s:15,.0f} "
                     f"{c.per_s / base[(c.kind, c.size, c.gc)]:10.2f} {c.per_s / TARGET_PER_CORE:15.2f}")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="distinct flows (or DNS events) per interval")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gc", choices=("agent", "default", "both"), default="agent",
                        help="garbage-collector settings: the agent's (flowtel.gcpolicy), CPython's, or both in one run")
    parser.add_argument("--connectors", choices=("bench", "shipped"), default="bench",
                        help="servicegraph + four hubblemetrics families, or config/flowtel.yaml's connectors")
    parser.add_argument("--kinds", default="flows,dns", help="inputs: flows, dns or both")
    parser.add_argument("--chunk", type=int, default=None,
                        help="flow records handed on at a time, as the receiver's drain does (default: its "
                             "DRAIN_CHUNK_RECORDS; 0: the whole interval as one batch)")
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    modes = ("default", "agent") if args.gc == "both" else (args.gc,)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    print(report(run(sizes, args.reps, modes, args.connectors, kinds, args.chunk)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
