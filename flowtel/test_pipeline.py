"""Pipeline runtime: order of start/stop, bounded hand-off with counted drops, exporter isolation."""
from __future__ import annotations

import threading
import time

from flowtel.component import (
    ComponentConfig,
    Connector,
    ConnectorFactory,
    Consumer,
    CreateSettings,
    Exporter,
    ExporterFactory,
    Extension,
    ExtensionFactory,
    Kind,
    Processor,
    ProcessorFactory,
    Receiver,
    ReceiverFactory,
    wait_consumed,
)
from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.records import Flow, LostEvents, MetricKind, MetricPoint, Verdict, frozen_extensions, replace

EVENTS: list[str] = []


def flow(i: int) -> Flow:
    return Flow(time_ns=i, node_name="n", verdict=Verdict.FORWARDED, ip_version=4, src_ip="1.1.1.1", dst_ip="2.2.2.2", protocol=6, src_port=i)


class Cfg(ComponentConfig):
    count: int = 0
    fail: bool = False
    delay: float = 0.0


class Src(Receiver):
    def __init__(self, settings: CreateSettings, cfg: Cfg, nxt: Consumer) -> None:
        super().__init__(settings, nxt)
        self.cfg = cfg

    def start(self) -> None:
        EVENTS.append(f"start {self.settings.id}")

    def shutdown(self) -> None:
        # The last drain happens at shutdown and must still reach the exporters.
        self.next_consumer.consume([flow(i) for i in range(self.cfg.count)])
        EVENTS.append(f"stop {self.settings.id}")


class Tag(Processor):
    def start(self) -> None:
        EVENTS.append(f"start {self.settings.id}")

    def shutdown(self) -> None:
        EVENTS.append(f"stop {self.settings.id}")

    def process(self, batch: list) -> list:
        # Records are immutable: a processor returns new ones.
        return [replace(r, extensions=frozen_extensions({**r.extensions, "tagged": True})) if isinstance(r, Flow) else r
                for r in batch]


class Hold(Processor):
    """Holds every record until shutdown, as an aggregation window does."""

    def __init__(self, settings: CreateSettings) -> None:
        super().__init__(settings)
        self.held: list = []

    def process(self, batch: list) -> list:
        self.held.extend(batch)
        return []

    def flush(self) -> list:
        out, self.held = self.held, []
        return out


class Sink(Exporter):
    def __init__(self, settings: CreateSettings, cfg: Cfg) -> None:
        super().__init__(settings)
        self.cfg = cfg
        self.got: list = []

    def start(self) -> None:
        EVENTS.append(f"start {self.settings.id}")

    def shutdown(self) -> None:
        EVENTS.append(f"stop {self.settings.id}")

    def consume(self, batch: list) -> None:
        if self.cfg.delay:
            time.sleep(self.cfg.delay)
        if self.cfg.fail:
            raise ConnectionError("backend down")
        self.got.extend(batch)


class Count(Connector):
    def __init__(self, settings: CreateSettings, cfg: Cfg, nxt: Consumer) -> None:
        super().__init__(settings, nxt)
        self.n = 0

    def consume(self, batch: list) -> None:
        self.n += len(batch)

    def shutdown(self) -> None:
        self.next_consumer.consume([flow(self.n)])


class Tap(Extension):
    taps = ("logs",)

    def __init__(self, settings: CreateSettings) -> None:
        super().__init__(settings)
        self.got: list = []

    def consume(self, batch: list) -> None:
        self.got.extend(batch)


FACTORIES = {
    Kind.RECEIVER: {"src": ReceiverFactory("src", Cfg, Src)},
    Kind.PROCESSOR: {
        "tag": ProcessorFactory("tag", Cfg, lambda s, c: Tag(s)),
        "hold": ProcessorFactory("hold", Cfg, lambda s, c: Hold(s)),
    },
    Kind.EXPORTER: {"sink": ExporterFactory("sink", Cfg, Sink)},
    Kind.CONNECTOR: {"count": ConnectorFactory("count", Cfg, Count, consumes="logs", emits="logs")},
    Kind.EXTENSION: {"tap": ExtensionFactory("tap", Cfg, lambda s, c: Tap(s))},
}


def build(cfg: dict, queue_records: int = 100_000) -> Service:
    return Service(parse_config(cfg, "test.yaml", factories=FACTORIES, environ={}), node_name="n", factories=FACTORIES, queue_records=queue_records)


def test_start_order_and_reverse_shutdown_with_final_flush() -> None:
    EVENTS.clear()
    svc = build(
        {
            "receivers": {"src": {"count": 5}},
            "processors": {"tag": {}},
            "exporters": {"sink": {}},
            "service": {"pipelines": {"logs": {"receivers": ["src"], "processors": ["tag"], "exporters": ["sink"]}}},
        }
    )
    svc.start()
    svc.shutdown()
    assert EVENTS == ["start sink", "start tag", "start src", "stop src", "stop tag", "stop sink"]
    got = svc.exporters["sink"].got
    assert len(got) == 5 and all(r.extensions["tagged"] for r in got)


def test_processor_flush_at_shutdown_goes_through_later_processors() -> None:
    svc = build(
        {
            "receivers": {"src": {"count": 4}},
            "processors": {"hold": {}, "tag": {}},
            "exporters": {"sink": {}},
            "service": {"pipelines": {"logs": {"receivers": ["src"], "processors": ["hold", "tag"], "exporters": ["sink"]}}},
        }
    )
    svc.start()
    svc.shutdown()
    got = [r for r in svc.exporters["sink"].got if isinstance(r, Flow)]
    assert sorted(r.src_port for r in got) == [0, 1, 2, 3]
    assert all(r.extensions["tagged"] for r in got)


def test_failing_exporter_does_not_stop_the_other() -> None:
    svc = build(
        {
            "receivers": {"src": {"count": 50}},
            "exporters": {"sink/bad": {"fail": True}, "sink/good": {}},
            "service": {"pipelines": {"logs": {"receivers": ["src"], "exporters": ["sink/bad", "sink/good"]}}},
        }
    )
    svc.start()
    svc.shutdown()
    good = svc.exporters["sink/good"].got
    assert len([r for r in good if isinstance(r, Flow)]) == 50
    # The failed export is reported as lost, through the exporters that work. (The report
    # itself also fails at sink/bad, and is counted there too.)
    assert [(r.source, r.count) for r in good if isinstance(r, LostEvents)] == [("EXPORT_FAILED:sink/bad", 50)]
    assert svc.telemetry.get("sink/bad", "records_failed") == 51


def test_full_queue_drops_and_counts() -> None:
    svc = build(
        {
            "receivers": {"src": {}},
            "exporters": {"sink": {"delay": 0.3}},
            "service": {"pipelines": {"logs": {"receivers": ["src"], "exporters": ["sink"]}}},
        },
        queue_records=10,
    )
    svc.start()
    consumer = svc.receivers["src"].next_consumer
    sent = 0
    for _ in range(30):
        consumer.consume([flow(i) for i in range(4)])
        sent += 4
    svc.shutdown()
    dropped = svc.telemetry.get("pipeline/logs", "records_dropped") + svc.telemetry.get("sink", "records_dropped")
    assert dropped > 0
    flows = [r for r in svc.exporters["sink"].got if isinstance(r, Flow)]
    assert len(flows) + dropped == sent, "every record is either delivered or counted as dropped"
    # The drops are reported downstream as LostEvents records (Hubble's lost events).
    lost = [r for r in svc.exporters["sink"].got if isinstance(r, LostEvents)]
    assert lost and sum(r.count for r in lost) <= dropped
    assert all(r.source.startswith("QUEUE_FULL:") for r in lost)


def test_connector_feeds_second_pipeline_including_final_emit() -> None:
    svc = build(
        {
            "receivers": {"src": {"count": 7}},
            "connectors": {"count": {}},
            "exporters": {"sink": {}},
            "service": {
                "pipelines": {
                    "logs": {"receivers": ["src"], "exporters": ["count"]},
                    "logs/derived": {"receivers": ["count"], "exporters": ["sink"]},
                }
            },
        }
    )
    svc.start()
    svc.shutdown()
    got = svc.exporters["sink"].got
    assert [r.time_ns for r in got] == [7]


def test_start_failure_shuts_down_what_started() -> None:
    EVENTS.clear()

    class Boom(Src):
        def start(self) -> None:
            raise RuntimeError("no kernel")

    factories = dict(FACTORIES)
    factories[Kind.RECEIVER] = {"src": ReceiverFactory("src", Cfg, Boom)}
    cfg = parse_config(
        {"receivers": {"src": {}}, "exporters": {"sink": {}}, "service": {"pipelines": {"logs": {"receivers": ["src"], "exporters": ["sink"]}}}},
        "t.yaml",
        factories=factories,
        environ={},
    )
    svc = Service(cfg, node_name="n", factories=factories)
    try:
        svc.start()
    except RuntimeError:
        pass
    else:
        raise AssertionError("start must raise")
    assert EVENTS == ["start sink", "stop sink"]
    assert not [t for t in threading.enumerate() if t.name.startswith("flowtel-") and t.is_alive()]


def test_one_receiver_feeds_metrics_and_logs_pipelines_by_signal() -> None:
    svc = build(
        {
            "receivers": {"src": {}},
            "exporters": {"sink/metrics": {}, "sink/logs": {}},
            "service": {
                "pipelines": {
                    "metrics": {"receivers": ["src"], "exporters": ["sink/metrics"]},
                    "logs": {"receivers": ["src"], "exporters": ["sink/logs"]},
                }
            },
        }
    )
    svc.start()
    consumer = svc.receivers["src"].next_consumer
    assert consumer.wants("metrics") and consumer.wants("logs")
    consumer.consume([MetricPoint("m", 1.0, MetricKind.SUM, 0)])
    consumer.consume([flow(1), flow(2)])
    svc.shutdown()
    assert [type(r).__name__ for r in svc.exporters["sink/metrics"].got] == ["MetricPoint"]
    assert [type(r).__name__ for r in svc.exporters["sink/logs"].got] == ["Flow", "Flow"]


def test_receiver_in_logs_only_does_not_want_metrics() -> None:
    svc = build(
        {
            "receivers": {"src": {}},
            "exporters": {"sink": {}},
            "service": {"pipelines": {"logs": {"receivers": ["src"], "exporters": ["sink"]}}},
        }
    )
    assert not svc.receivers["src"].next_consumer.wants("metrics")


def test_tapping_extension_sees_processed_records_of_its_signal() -> None:
    svc = build(
        {
            "receivers": {"src": {"count": 3}},
            "processors": {"tag": {}},
            "exporters": {"sink": {}},
            "extensions": {"tap": {}},
            "service": {
                "extensions": ["tap"],
                "pipelines": {"logs": {"receivers": ["src"], "processors": ["tag"], "exporters": ["sink"]}},
            },
        }
    )
    svc.start()
    svc.shutdown()
    tapped = svc.extensions["tap"].got
    assert len(tapped) == 3 and all(r.extensions["tagged"] for r in tapped)


def test_a_batch_larger_than_the_queue_keeps_what_fits() -> None:
    svc = build(
        {
            "receivers": {"src": {}},
            "exporters": {"sink": {"delay": 0.5}},
            "service": {"pipelines": {"logs": {"receivers": ["src"], "exporters": ["sink"]}}},
        },
        queue_records=20_000,
    )
    svc.start()
    svc.receivers["src"].next_consumer.consume([flow(i) for i in range(50_000)])
    svc.shutdown()
    got = len([r for r in svc.exporters["sink"].got if isinstance(r, Flow)])
    dropped = svc.telemetry.get("pipeline/logs", "records_dropped") + svc.telemetry.get("sink", "records_dropped")
    assert got >= 16_384, "the parts that fit the queue must get through"
    assert got + dropped == 50_000


class Ticking(Processor):
    """Releases one record per tick; its second tick fails (an error the timer must survive)."""

    tick_interval = 0.05

    def __init__(self, settings: CreateSettings) -> None:
        super().__init__(settings)
        self.ticks = 0

    def process(self, batch: list) -> list:
        return batch

    def tick(self) -> list:
        self.ticks += 1
        if self.ticks == 2:
            raise RuntimeError("tick failed")
        return [flow(1000 + self.ticks)]


def test_processor_ticks_go_through_later_processors_and_survive_a_failure() -> None:
    factories = {**FACTORIES, Kind.PROCESSOR: {**FACTORIES[Kind.PROCESSOR],
                                               "ticking": ProcessorFactory("ticking", Cfg, lambda s, c: Ticking(s))}}
    cfg = {
        "receivers": {"src": {}},
        "processors": {"ticking": {}, "tag": {}},
        "exporters": {"sink": {}},
        "service": {"pipelines": {"logs": {"receivers": ["src"], "processors": ["ticking", "tag"], "exporters": ["sink"]}}},
    }
    svc = Service(parse_config(cfg, "test.yaml", factories=factories, environ={}), node_name="n", factories=factories)
    svc.start()
    try:
        sink = svc.exporters["sink"]
        deadline = time.monotonic() + 5
        while len(sink.got) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Released by ticks alone (the receiver sends nothing), through "tag", past the failed tick.
        assert [r.src_port for r in sink.got[:3]] == [1001, 1003, 1004]
        assert all(r.extensions["tagged"] for r in sink.got)
        assert svc.telemetry.get("pipeline/logs", "ticks_failed") == 1
    finally:
        svc.shutdown()
    ticks = svc.processors[("logs", "ticking")].ticks  # type: ignore[attr-defined]
    time.sleep(0.15)
    assert svc.processors[("logs", "ticking")].ticks == ticks  # type: ignore[attr-defined]  # no ticks after shutdown


def test_wait_consumed_returns_once_every_exporter_has_handled_the_batch() -> None:
    # What a chunked drain relies on: after wait_consumed, the batches handed on so far are in
    # every exporter of every pipeline fed, the slow one and the tapping extension included.
    svc = build(
        {
            "receivers": {"src": {}},
            "processors": {"tag": {}},
            "exporters": {"sink/slow": {"delay": 0.3}, "sink/fast": {}},
            "extensions": {"tap": {}},
            "service": {"extensions": ["tap"],
                        "pipelines": {"logs": {"receivers": ["src"], "processors": ["tag"],
                                               "exporters": ["sink/slow", "sink/fast"]}}},
        }
    )
    svc.start()
    try:
        consumer = svc.receivers["src"].next_consumer
        for chunk in range(3):
            consumer.consume([flow(chunk * 10 + i) for i in range(10)])
            assert wait_consumed(consumer, 10.0)
            for got in (svc.exporters["sink/slow"].got, svc.exporters["sink/fast"].got, svc.extensions["tap"].got):
                assert sorted(r.src_port for r in got if isinstance(r, Flow)) == list(range(chunk * 10 + 10))
        # Bounded: a consumer that cannot finish in time says so instead of blocking.
        consumer.consume([flow(99)])
        assert not wait_consumed(consumer, 0.05)
    finally:
        svc.shutdown()
