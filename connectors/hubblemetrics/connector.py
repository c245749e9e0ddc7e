"""The ``hubblemetrics`` connector: flows (logs) in, Hubble's ``hubble_*`` counters (metrics) out.

Counting (why rates match Hubble's): Hubble reports one flow event per packet at each
observation point, so an aggregated L3/L4 record counts as its ``packets``; drops count per
dropped packet (the kernel reports each); DNS counts per message. Records that repeat packets
counted elsewhere (TCP event records, the unanswered-DNS record) are not counted.
"""
from __future__ import annotations

import logging
import threading
import time

from connectors.hubblemetrics.config import HubbleMetricsConfig
from connectors.hubblemetrics.families import FAMILIES
from connectors.hubblemetrics.handler import Batch, Handler, MetricInfo
from connectors.hubblemetrics.options import OptionError, parse_context, parse_metric, reject_unknown, split_metrics
from connectors.hubblemetrics.series import SeriesStore
from connectors.hubblemetrics.version_info import version_point
from flowtel.component import Connector, Consumer, CreateSettings, consumer_wants
from flowtel.records import LostEvents, MetricKind, MetricPoint, Record

log = logging.getLogger("flowtel.connector.hubblemetrics")


def build_handlers(metrics: list[str]) -> list[Handler]:
    """One handler per metric string; raises :class:`OptionError` naming the bad string."""
    handlers: list[Handler] = []
    seen: dict[str, str] = {}
    families: dict[str, str] = {}
    for text in split_metrics(metrics):
        spec = parse_metric(text)
        create = FAMILIES.get(spec.name)
        if create is None:
            hint = ("; an entry is split at whitespace into metric strings, as Cilium's hubble-metrics value "
                    "is: write each string without spaces" if any(len(e.split()) > 1 for e in metrics) else "")
            raise OptionError(f"{text!r}: unknown metric family {spec.name!r}; known: {', '.join(FAMILIES)}{hint}")
        if spec.name in families:
            raise OptionError(f"{text!r}: family {spec.name!r} is already defined by {families[spec.name]!r}")
        if {spec.name, *families} >= {"http", "httpV2"}:
            raise OptionError(f"{text!r}: http and httpV2 cannot both be enabled (as in Hubble)")
        families[spec.name] = text
        options = dict(spec.options)
        context = parse_context(options, spec.name)
        handler = create(options, context)
        reject_unknown(options, text)
        for info in handler.metrics:
            if info.name in seen:
                raise OptionError(f"{text!r}: {info.name} is already defined by {seen[info.name]!r}")
            seen[info.name] = text
        handlers.append(handler)
    return handlers


class HubbleMetricsConnector(Connector):
    def __init__(self, settings: CreateSettings, config: HubbleMetricsConfig, next_consumer: Consumer) -> None:
        super().__init__(settings, next_consumer)
        self.config = config
        self.handlers = build_handlers(config.metrics)
        for h in self.handlers:
            if h.notice:
                log.warning("hubblemetrics: %s", h.notice)
        self.infos: dict[str, MetricInfo] = {i.name: i for h in self.handlers for i in h.metrics}
        self.store = SeriesStore(config.max_series, config.series_expiry)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        settings.telemetry.register_gauge(settings.id, "series", lambda: len(self.store))
        settings.telemetry.register_gauge(settings.id, "series_overflow", lambda: self.store.overflow)

    def start(self) -> None:
        # On a timer, not per batch: idle pods still need their cumulative values re-sent.
        self._thread = threading.Thread(target=self._run, name="flowtel-hubblemetrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval):
            try:
                self.flush()
            except Exception:
                self.settings.telemetry.add(self.settings.id, "flush_errors")
                log.exception("emitting hubble metrics failed")

    def consume(self, batch: list[Record]) -> None:
        handlers = self.handlers
        flows = Batch(batch)
        lost = [r for r in batch if isinstance(r, LostEvents)]
        with self._lock:
            store = self.store
            emit = store.add
            store.batch_time = time.monotonic()
            try:
                for h in handlers:
                    h.process_batch(flows, emit)
                for record in lost:
                    for h in handlers:
                        h.process_lost(record, emit)
            finally:
                store.batch_time = None
        self.settings.telemetry.add(self.settings.id, "records_in", len(batch))

    def points(self, now_ns: int | None = None) -> list[MetricPoint]:
        """Every live series' cumulative value, after dropping idle ones."""
        t = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            self.store.expire()
            items = self.store.items()
        out: list[MetricPoint] = []
        for name, labels, value in items:
            info = self.infos[name]
            out.append(MetricPoint(name, value, MetricKind.SUM, t, dict(zip(info.label_names, labels)), "1",
                                   info.description))
        if self.config.version_info:
            out.append(version_point(t))
        return out

    def flush(self) -> None:
        if not consumer_wants(self.next_consumer, "metrics"):
            return
        batch = self.points()
        if batch:
            self.next_consumer.consume(batch)  # type: ignore[arg-type]  # a list is invariant: list[MetricPoint] is a batch of records all the same

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        # The last values, so counts since the previous interval reach the exporters.
        self.flush()
