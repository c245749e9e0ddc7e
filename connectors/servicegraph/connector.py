"""The ``servicegraph`` connector: flows (logs) in, ``flowtel_service_graph_*`` points (metrics) out."""
from __future__ import annotations

import logging
import threading
import time

from connectors.servicegraph.config import ServiceGraphConfig
from flowtel.component import Connector, Consumer, CreateSettings, consumer_wants
from flowtel.records import MetricKind, MetricPoint, Record
from flowtel.servicegraph import EdgeKey, EdgeStats, ServiceGraph

log = logging.getLogger("flowtel.connectors.servicegraph")

PREFIX = "flowtel_service_graph_"
# name suffix, unit, description; the values come from EdgeStats in _points.
FAMILIES = {
    "request_total": ("1", "Flow records between client and server, by protocol, server port and verdict"),
    "bytes_total": ("By", "Bytes of L3/L4 flows between client and server, both directions"),
    "dropped_total": ("1", "Packets between client and server with verdict DROPPED"),
    "dns_latency_seconds_sum": ("s", "Sum of DNS response latencies on the edge"),
    "dns_latency_seconds_count": ("1", "DNS responses with a latency on the edge"),
    "tcp_handshake_rtt_seconds_sum": ("s", "Sum of TCP handshake round-trip times on the edge"),
    "tcp_handshake_rtt_seconds_count": ("1", "TCP handshakes with a measured RTT on the edge"),
}


def points(edges: list[tuple[EdgeKey, EdgeStats]], now_ns: int) -> list[MetricPoint]:
    """Cumulative points for every edge. Drop, DNS and RTT series appear only on edges that
    have such data, so a graph of plain TCP edges costs two series per edge, not seven."""
    out: list[MetricPoint] = []
    append = out.append
    point, total = MetricPoint, MetricKind.SUM
    (requests, requests_unit, requests_help), (sent, sent_unit, sent_help) = _PLAIN
    for key, s in edges:
        labels = key.labels()  # one dict per edge, shared by its points (read-only)
        append(point(requests, s.flows, total, now_ns, labels, requests_unit, requests_help))
        append(point(sent, s.bytes, total, now_ns, labels, sent_unit, sent_help))
        if s.dropped or key.verdict == "DROPPED" or s.dns_latency_count or s.handshake_rtt_count:
            for suffix, value in _rarer(key, s):
                unit, description = FAMILIES[suffix]
                append(point(PREFIX + suffix, value, total, now_ns, labels, unit, description))
    return out


_PLAIN = tuple((PREFIX + suffix, *FAMILIES[suffix]) for suffix in ("request_total", "bytes_total"))


def _rarer(key: EdgeKey, s: EdgeStats) -> list[tuple[str, float]]:
    """The series only some edges have: drops, DNS latency, handshake RTT."""
    out: list[tuple[str, float]] = []
    if s.dropped or key.verdict == "DROPPED":
        out.append(("dropped_total", s.dropped))
    if s.dns_latency_count:
        out.append(("dns_latency_seconds_sum", s.dns_latency_ns_sum / 1e9))
        out.append(("dns_latency_seconds_count", s.dns_latency_count))
    if s.handshake_rtt_count:
        out.append(("tcp_handshake_rtt_seconds_sum", s.handshake_rtt_ns_sum / 1e9))
        out.append(("tcp_handshake_rtt_seconds_count", s.handshake_rtt_count))
    return out


class ServiceGraphConnector(Connector):
    """Counts flows into the graph on the pipeline's thread; emits every edge on its own timer.

    With ``metrics_flush_interval`` > 0 a thread emits all edges' cumulative values every
    interval whether or not flows arrived (an idle edge keeps its series alive downstream
    until it expires); with 0 they are emitted after every batch instead. ``consume`` and
    the timer share the graph (it has its own lock); emissions are serialized so that a
    cumulative series never goes back in time downstream.
    """

    def __init__(self, settings: CreateSettings, config: ServiceGraphConfig, next_consumer: Consumer) -> None:
        super().__init__(settings, next_consumer)
        self.config = config
        self.graph = ServiceGraph(granularity=config.granularity, expire_after=config.expire_after,
                                  max_edges=config.max_edges)
        self._emit_lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        settings.telemetry.register_gauge(settings.id, "edges", lambda: len(self.graph))
        settings.telemetry.register_gauge(settings.id, "edges_overflow_flows", lambda: self.graph.overflow)

    def start(self) -> None:
        if self.config.metrics_flush_interval > 0:
            self._timer = threading.Thread(target=self._run_timer, name=f"flowtel-{self.settings.id}-flush",
                                           daemon=True)
            self._timer.start()

    def _run_timer(self) -> None:
        while not self._stop.wait(self.config.metrics_flush_interval):
            try:
                self.flush()
            except Exception:  # a failing emission must not end the timer: the next one retries
                self.settings.telemetry.add(self.settings.id, "flushes_failed")
                log.exception("%s: emitting the service graph failed (counted)", self.settings.id)

    def consume(self, batch: list[Record]) -> None:
        self.graph.add(batch)
        if self.config.metrics_flush_interval <= 0:
            self.flush()

    def flush(self) -> None:
        """Forget expired edges, then emit every remaining edge's cumulative values now."""
        with self._emit_lock:
            expired = self.graph.expire()
            self.settings.telemetry.add(self.settings.id, "edges_expired", expired)
            if not consumer_wants(self.next_consumer, "metrics"):
                return
            batch = points(self.graph.snapshot(), time.time_ns())
            if batch:
                self.next_consumer.consume(batch)  # type: ignore[arg-type]  # a list is invariant: list[MetricPoint] is a batch of records all the same

    def shutdown(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(10)
        # The last values, so counts since the previous emission reach the exporters.
        self.flush()
