"""The ``servicegraph`` connector: flows (logs) in, ``flowtel_service_graph_*`` points (metrics) out."""
from __future__ import annotations

import time

from connectors.servicegraph.config import ServiceGraphConfig
from flowtel.component import Connector, Consumer, CreateSettings, consumer_wants
from flowtel.records import MetricKind, MetricPoint, Record
from flowtel.servicegraph import EdgeKey, EdgeStats, ServiceGraph

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

    def emit(suffix: str, value: float, labels: dict[str, str]) -> None:
        unit, description = FAMILIES[suffix]
        out.append(MetricPoint(PREFIX + suffix, value, MetricKind.SUM, now_ns, dict(labels), unit, description))

    for key, s in edges:
        labels = key.labels()
        emit("request_total", s.flows, labels)
        emit("bytes_total", s.bytes, labels)
        if s.dropped or key.verdict == "DROPPED":
            emit("dropped_total", s.dropped, labels)
        if s.dns_latency_count:
            emit("dns_latency_seconds_sum", s.dns_latency_ns_sum / 1e9, labels)
            emit("dns_latency_seconds_count", s.dns_latency_count, labels)
        if s.handshake_rtt_count:
            emit("tcp_handshake_rtt_seconds_sum", s.handshake_rtt_ns_sum / 1e9, labels)
            emit("tcp_handshake_rtt_seconds_count", s.handshake_rtt_count, labels)
    return out


class ServiceGraphConnector(Connector):
    def __init__(self, settings: CreateSettings, config: ServiceGraphConfig, next_consumer: Consumer) -> None:
        super().__init__(settings, next_consumer)
        self.config = config
        self.graph = ServiceGraph(granularity=config.granularity, expire_after=config.expire_after,
                                  max_edges=config.max_edges)
        self._next_flush = 0.0
        settings.telemetry.register_gauge(settings.id, "edges", lambda: len(self.graph))
        settings.telemetry.register_gauge(settings.id, "edges_overflow_flows", lambda: self.graph.overflow)

    def consume(self, batch: list[Record]) -> None:
        self.graph.add(batch)
        now = time.monotonic()
        if now >= self._next_flush:
            self._next_flush = now + self.config.metrics_flush_interval
            self.flush()

    def flush(self) -> None:
        """Emit every edge's cumulative values now."""
        if not consumer_wants(self.next_consumer, "metrics"):
            return
        self.graph.expire()
        batch = points(self.graph.snapshot(), time.time_ns())
        if batch:
            self.next_consumer.consume(batch)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        # The last values, so counts since the previous flush reach the exporters.
        self.flush()
