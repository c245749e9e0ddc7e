"""The behaviour shared by the ``otlp`` (gRPC) and ``otlphttp`` exporters; each adds its transport.

Logs: each batch of flow-log records is encoded into requests right away and queued.
Metrics: points update the series store; every ``export_interval`` (and on flush) every
live series is collected, cumulative or delta as configured, as the SDK's ``MetricsData``
(chunks of at most ``max_batch_size`` points) and queued for the transport's SDK
``OTLPMetricExporter``.
"""
from __future__ import annotations

import logging
import threading
import time

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from flowtel.lib.exporterhelper.flowlog_filter import FlowLogFilter
from flowtel.lib.exporterhelper.metrics_data import to_metrics_data
from flowtel.lib.exporterhelper.otlp_config import OtlpExporterConfig
from flowtel.lib.exporterhelper.otlp_encoding import FLOWTEL_VERSION, OtlpEncoder, resource_attributes
from flowtel.lib.exporterhelper.sending import Request, SendingQueue, Transport
from flowtel.lib.exporterhelper.selftelemetry import telemetry_points
from flowtel.lib.metrics.series import SeriesStore
from flowtel.component import CreateSettings, Exporter
from flowtel.records import MetricPoint, Record

log = logging.getLogger("flowtel.exporters.otlp")

# Bound on the final send when the agent stops: long enough for a healthy backend to take
# a full queue, short enough that a dead backend does not hold up the node's shutdown.
SHUTDOWN_DRAIN_SECONDS = 5.0


class OtlpExporter(Exporter):
    def __init__(self, settings: CreateSettings, config: OtlpExporterConfig, transport: Transport) -> None:
        super().__init__(settings)
        self.config = config
        cid = settings.id
        self._telemetry = settings.telemetry
        self._filter = FlowLogFilter(config)
        resource = resource_attributes(settings.node_name)
        self._encoder = OtlpEncoder(resource, config.max_batch_size, config.log_body,
                                    self._filter.mask if self._filter.masking else None)
        # Resource() rather than Resource.create(): resource_attributes already applied the
        # OTEL_RESOURCE_ATTRIBUTES/OTEL_SERVICE_NAME detection, and the SDK's telemetry.sdk.*
        # defaults would describe the SDK, not the agent.
        self._resource = Resource(resource)
        self._scope = InstrumentationScope("flowtel", FLOWTEL_VERSION)
        self._store = SeriesStore(cid, config.cardinality_limit, config.series_ttl)
        self._queue = SendingQueue(
            cid, transport, timeout=config.timeout, retry=config.retry_on_failure,
            queue=config.sending_queue, telemetry=settings.telemetry,
        )
        self._stop = threading.Event()
        self._flush_drained = True  # False when the last flush timed out: the backend is not taking data
        self._collect_lock = threading.Lock()  # the timer and flush must not interleave delta baselines
        self._timer: threading.Thread | None = None
        self._telemetry.register_gauge(cid, "series", lambda: len(self._store))

    def start(self) -> None:
        self._queue.start()
        self._timer = threading.Thread(target=self._run_timer, name=f"flowtel-{self.settings.id}-collect",
                                       daemon=True)
        self._timer.start()

    def consume(self, batch: list[Record]) -> None:
        if not batch:
            return
        cid = self.settings.id
        self._telemetry.add(cid, "records_in", len(batch))
        if isinstance(batch[0], MetricPoint):
            if not all(isinstance(r, MetricPoint) for r in batch):
                raise TypeError("a batch mixes metric points and flow-log records")
            result = self._store.update(batch)  # type: ignore[arg-type]  # every record was checked to be a MetricPoint just above
            self._telemetry.add(cid, "series_refused", result.refused)
            self._telemetry.add(cid, "records_dropped", result.refused)
            return
        selected = self._filter.select(batch)
        # Left out by allow_list/deny_list: counted, not an error.
        self._telemetry.add(cid, "records_filtered", len(batch) - len(selected))
        if not selected:
            return
        # Encode everything first: a record that cannot be encoded fails the batch, unsent.
        requests = list(self._encoder.logs(selected, time.time_ns()))
        for payload, items in requests:
            self._queue.submit(Request("logs", payload, items))

    def collect(self) -> int:
        """Queue every live series now; returns the number of data points queued."""
        with self._collect_lock:
            expired = self._store.expire()
            self._telemetry.add(self.settings.id, "series_expired", expired)
            now_ns = time.time_ns()
            if self.config.self_telemetry:
                # Through the store, so delta temporality and start times apply to them too.
                self._store.update(telemetry_points(self._telemetry, now_ns))
            families = self._store.collect(self.config.temporality, now_ns)
            queued = 0
            for data, items in to_metrics_data(families, self.config.temporality, now_ns, self._resource,
                                               self._scope, self.config.max_batch_size):
                self._queue.submit(Request("metrics", data, items))
                queued += items
            return queued

    def flush(self) -> None:
        """Queue the final metric points and wait (boundedly) until everything queued is sent."""
        self.collect()
        self._flush_drained = self._queue.drain(SHUTDOWN_DRAIN_SECONDS)

    def drain(self, timeout: float) -> bool:
        """Wait until every queued request was sent or given up (tests and flush)."""
        return self._queue.drain(timeout)

    def shutdown(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(self.config.timeout + 1.0)
        # The agent calls flush, then shutdown: if the flush already waited in vain, the
        # backend is not taking data, and waiting a second time would only delay the node.
        self._queue.close(SHUTDOWN_DRAIN_SECONDS if self._flush_drained else 0.0)

    def _run_timer(self) -> None:
        interval = self.config.export_interval
        while not self._stop.wait(interval):
            try:
                self.collect()
            except Exception:  # a failed cycle must not end the periodic export
                log.exception("%s: metrics collection failed", self.settings.id)
