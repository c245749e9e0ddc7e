"""flowaggregate: per-key sums over fixed windows, pass-through rules, bounded keys, shutdown flush."""
from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from flowtel.component import ComponentConfig, Consumer, CreateSettings, Exporter, Factory, Kind, Receiver, Telemetry
from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.lib.hubble.convert import flow_json
from flowtel.lib.hubble.parse import parse_rfc3339
from flowtel.records import DnsInfo, Endpoint, EventKind, Flow, LostEvents, TcpFlagCounts, Verdict, Workload, frozen_extensions
from processors.flowaggregate.config import FlowAggregateConfig
from processors.flowaggregate.factory import FACTORY
from processors.flowaggregate.processor import FlowAggregateProcessor

S = 1_000_000_000


class Clock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def make(clock: Clock, **cfg) -> tuple[FlowAggregateProcessor, Telemetry]:
    tel = Telemetry()
    proc = FlowAggregateProcessor(CreateSettings("flowaggregate", "n", tel), FlowAggregateConfig(**cfg), clock=clock)
    return proc, tel


def flow(src="10.0.0.1", dst="10.0.0.2", dport=80, packets=1, nbytes=100, sport=40000, **kw) -> Flow:
    return Flow(
        time_ns=1, node_name="n", verdict=kw.pop("verdict", Verdict.FORWARDED), ip_version=4, src_ip=src, dst_ip=dst,
        protocol=kw.pop("protocol", 6), src_port=sport, dst_port=dport, packets=packets, bytes=nbytes, **kw,
    )


def test_config_defaults_and_validation() -> None:
    cfg = FlowAggregateConfig()
    assert cfg.window == 30.0 and cfg.dns is False
    assert FlowAggregateConfig(window="10s").window == 10.0
    with pytest.raises(ValidationError):
        FlowAggregateConfig(window="0s")
    with pytest.raises(ValidationError):
        FlowAggregateConfig(max_keys=0)
    assert FACTORY.type == "flowaggregate" and FACTORY.signals == ("logs",)


def test_same_key_merged_with_sums() -> None:
    clock = Clock(100 * S)
    proc, tel = make(clock, window=30)
    # Different source ports, same key: merged.
    x = frozen_extensions({"x": 1})
    assert proc.process([flow(sport=1, packets=2, nbytes=200, extensions=x, ifname="veth1", tcp_flags=0x02,
                              tcp_flag_counts=TcpFlagCounts(syn=1)),
                         flow(sport=2, packets=3, nbytes=300, extensions=x, ifname="veth1", tcp_flags=0x10,
                              tcp_flag_counts=TcpFlagCounts(syn=0))]) == []
    assert proc.process([flow(sport=3, packets=5, nbytes=500, extensions=x, ifname="veth2", tcp_flags=0x11,
                              tcp_flag_counts=TcpFlagCounts(fin=2))]) == []
    clock.t = 120 * S  # window [90 s, 120 s) closed
    out = proc.process([])
    assert len(out) == 1
    f = out[0]
    assert (f.packets, f.bytes) == (10, 1000)
    # Sums of what was merged; what all agree on stays, what they disagree on is cleared.
    assert f.extensions == {"x": 1, "flows": 3, "window_start": "1970-01-01T00:01:30Z", "window_end": "1970-01-01T00:02:00Z"}
    assert f.tcp_flags == 0x13 and f.tcp_flag_counts == TcpFlagCounts(syn=1, fin=2)
    assert f.time_ns == 120 * S and f.src_port == 0 and f.dst_port == 80 and f.ifname == ""
    ext = flow_json(f)["extensions"]["value"]
    assert (ext["packets"], ext["bytes"], ext["flows"], ext["tcp_flags"]["SYN"], ext["tcp_flags"]["FIN"]) == (10, 1000, 3, 1, 2)
    assert tel.get("flowaggregate", "records_aggregated") == 3


def test_distinct_keys_kept_apart() -> None:
    clock = Clock(0)
    proc, _ = make(clock)
    pod = lambda name: Endpoint(namespace="ns", pod_name=name, workloads=(Workload(name="web", kind="Deployment"),))
    batch = [
        flow(dport=80), flow(dport=443), flow(protocol=17), flow(dst="10.0.0.3"),
        flow(traffic_direction="EGRESS"),
        # Pods are keyed by identity, not by IP: same pod with two IPs merges.
        flow(src="10.1.0.1", source=pod("a")), flow(src="10.1.0.2", source=pod("a")), flow(source=pod("b")),
    ]
    proc.process(batch)
    out = proc.flush()
    assert len(out) == 7
    assert sorted(f.extensions["flows"] for f in out) == [1, 1, 1, 1, 1, 1, 2]
    by_pod = {f.source.pod_name: f.extensions["flows"] for f in out if f.source is not None}
    assert by_pod == {"a": 2, "b": 1}


def test_window_boundaries() -> None:
    clock = Clock(29 * S)
    proc, _ = make(clock, window="30s")
    assert proc.process([flow()]) == []
    clock.t = 30 * S - 1  # still in [0, 30 s)
    assert proc.process([flow()]) == []
    clock.t = 30 * S  # the window closed: emitted, and the new batch opens [30 s, 60 s)
    out = proc.process([flow(packets=7)])
    assert [(f.extensions["flows"], f.extensions["window_start"], f.extensions["window_end"]) for f in out] == [
        (2, "1970-01-01T00:00:00Z", "1970-01-01T00:00:30Z")]
    clock.t = 95 * S  # a batch long after: the held window keeps its own bounds
    out = proc.process([])
    assert [(f.packets, f.extensions["window_start"], f.extensions["window_end"]) for f in out] == [
        (7, "1970-01-01T00:00:30Z", "1970-01-01T00:01:00Z")]
    assert proc.flush() == []


def test_drops_distinct_by_reason_and_verdict() -> None:
    proc, _ = make(Clock(0))
    d = lambda reason: flow(verdict=Verdict.DROPPED, kind=EventKind.DROP, drop_reason=reason)
    proc.process([d("POLICY_DENIED"), d("POLICY_DENIED"), d("CT_MAP_INSERTION_FAILED"), flow()])
    out = sorted(proc.flush(), key=lambda f: (f.verdict, f.drop_reason))
    assert [(f.verdict, f.drop_reason, f.extensions["flows"]) for f in out] == [
        (Verdict.DROPPED, "CT_MAP_INSERTION_FAILED", 1),
        (Verdict.DROPPED, "POLICY_DENIED", 2),
        (Verdict.FORWARDED, "", 1),
    ]


def test_drops_pass_through_when_disabled() -> None:
    proc, _ = make(Clock(0), drops=False)
    d = flow(verdict=Verdict.DROPPED, kind=EventKind.DROP, drop_reason="POLICY_DENIED")
    assert proc.process([d, flow()]) == [d]


def test_dns_passes_through_unless_configured() -> None:
    dns = lambda: flow(dport=53, protocol=17, kind=EventKind.DNS_REQUEST, l7=DnsInfo(query="a.example."))
    lost = LostEvents(0, "QUEUE_FULL:x", 3)
    proc, _ = make(Clock(0))
    batch = [dns(), dns(), lost]
    assert proc.process(batch) == batch
    assert proc.flush() == []
    proc, _ = make(Clock(0), dns=True)
    assert proc.process([dns(), dns(), lost]) == [lost]
    assert [f.extensions["flows"] for f in proc.flush()] == [2]


def test_max_keys_overflow_passes_through_counted() -> None:
    proc, tel = make(Clock(0), max_keys=2)
    extra = [flow(dport=3), flow(dport=4)]
    out = proc.process([flow(dport=1), flow(dport=2), *extra, flow(dport=1)])
    assert out == extra
    assert tel.get("flowaggregate", "records_overflow") == 2
    assert sorted(f.extensions["flows"] for f in proc.flush()) == [1, 2]


# A real Service: the last window reaches the exporter through the shutdown flush.
class Cfg(ComponentConfig):
    count: int = 0


class Src(Receiver):
    def __init__(self, settings: CreateSettings, cfg: Cfg, nxt: Consumer) -> None:
        super().__init__(settings, nxt)
        self.cfg = cfg

    def shutdown(self) -> None:
        self.next_consumer.consume([flow(sport=i, packets=1, nbytes=10) for i in range(self.cfg.count)])


class Sink(Exporter):
    def __init__(self, settings: CreateSettings, cfg: Cfg) -> None:
        super().__init__(settings)
        self.got: list = []

    def consume(self, batch: list) -> None:
        self.got.extend(batch)


FACTORIES = {
    Kind.RECEIVER: {"src": Factory("src", Kind.RECEIVER, Cfg, Src)},
    Kind.PROCESSOR: {"flowaggregate": FACTORY},
    Kind.EXPORTER: {"sink": Factory("sink", Kind.EXPORTER, Cfg, Sink)},
    Kind.CONNECTOR: {},
    Kind.EXTENSION: {},
}


def test_shutdown_flush_delivers_last_window_through_service() -> None:
    cfg = {
        "receivers": {"src": {"count": 5}},
        "processors": {"flowaggregate": {"window": "1h"}},
        "exporters": {"sink": {}},
        "service": {"pipelines": {"logs": {"receivers": ["src"], "processors": ["flowaggregate"], "exporters": ["sink"]}}},
    }
    svc = Service(parse_config(cfg, "t.yaml", factories=FACTORIES, environ={}), node_name="n", factories=FACTORIES)
    svc.start()
    svc.shutdown()
    got = [r for r in svc.exporters["sink"].got if isinstance(r, Flow)]
    assert len(got) == 1
    assert (got[0].extensions["flows"], got[0].packets, got[0].bytes) == (5, 5, 50)


def test_tick_emits_an_ended_window_without_further_input() -> None:
    clock = Clock(100 * S)
    proc, tel = make(clock, window="30s")
    assert proc.tick_interval == 1.0 and make(clock, window="2s")[0].tick_interval == 0.2
    assert make(clock, window="10ms")[0].tick_interval == 0.05
    assert proc.tick() == []  # nothing held
    proc.process([flow(packets=2), flow(packets=3)])
    clock.t = 120 * S - 1
    assert proc.tick() == []  # [90 s, 120 s) still open
    clock.t = 120 * S
    [f] = proc.tick()
    assert (f.packets, f.extensions["flows"], f.extensions["window_end"]) == (5, 2, "1970-01-01T00:02:00Z")
    assert proc.tick() == [] and proc.flush() == []
    assert tel.get("flowaggregate", "windows_emitted") == 1


class Feed(Receiver):
    """Hands its flows on once at start, then nothing: only a timer can close the window."""

    def __init__(self, settings: CreateSettings, cfg: Cfg, nxt: Consumer) -> None:
        super().__init__(settings, nxt)
        self.cfg = cfg

    def start(self) -> None:
        self.next_consumer.consume([flow(sport=i, packets=1, nbytes=10) for i in range(self.cfg.count)])


def test_window_closes_on_time_with_no_further_input() -> None:
    factories = {**FACTORIES, Kind.RECEIVER: {"feed": Factory("feed", Kind.RECEIVER, Cfg, Feed)}}
    cfg = {
        "receivers": {"feed": {"count": 4}},
        "processors": {"flowaggregate": {"window": "1s"}},
        "exporters": {"sink": {}},
        "service": {"pipelines": {"logs": {"receivers": ["feed"], "processors": ["flowaggregate"], "exporters": ["sink"]}}},
    }
    svc = Service(parse_config(cfg, "t.yaml", factories=factories, environ={}), node_name="n", factories=factories)
    svc.start()
    try:
        sink = svc.exporters["sink"]
        deadline = time.monotonic() + 5
        while not sink.got and time.monotonic() < deadline:
            time.sleep(0.02)
        seen_ns = time.time_ns()
        got = [r for r in sink.got if isinstance(r, Flow)]
        assert len(got) == 1, "the window was not emitted while the agent ran"
        f = got[0]
        assert (f.extensions["flows"], f.packets) == (4, 4)
        start, end = (parse_rfc3339(str(f.extensions[k])) for k in ("window_start", "window_end"))
        assert end - start == S and f.time_ns == end
        # Emitted after the window's end, within the tick interval (0.1 s) and queueing.
        assert end <= seen_ns < end + S // 2
    finally:
        svc.shutdown()
    assert len([r for r in svc.exporters["sink"].got if isinstance(r, Flow)]) == 1  # nothing held back twice
