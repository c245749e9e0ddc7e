"""The proxy's own metrics: ``flowtel_dnsproxy_*`` in Prometheus text on ``--metrics-listen``.

Read at scrape time from what the proxy already keeps (its :class:`~dnsproxy.server.Stats`,
its policy set, the datapath's pinned counters), so measuring costs nothing per query beyond
the counters themselves. The text is written by exporters/prometheus's exposition code, the
agent's own, so names, types and escaping follow the same rules in both processes.

Kept apart from the liveness/readiness server (dnsproxy/health.py): a probe must answer even
while a scrape renders a large page.
"""
from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Any, Callable, Iterable

from dnsproxy.bounded import CLIENT_ERROR_KINDS, BoundedHandler, BoundedHTTPServer, ServerLimits
from dnsproxy.wire import REJECT_REASONS
from exporters.common.series import FamilySnapshot, HistogramValue
from exporters.prometheus.exposition import CONTENT_TYPE, render
from flowtel.errors import StartError
from flowtel.records import MetricKind, MetricPoint

log = logging.getLogger("flowtel.dnsproxy")

DEFAULT_METRICS_PORT = 9967
# Seconds. Added latency is the proxy's own work per forwarded query (parse, policy, the allow-map
# write before the answer is released): tens of microseconds up; upstream latency reaches the
# upstream timeout (default 2 s).
ADDED_LATENCY_BOUNDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)
UPSTREAM_LATENCY_BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
PREFIX = "flowtel_dnsproxy_"
# A Prometheus or two scrape it; a scrape that takes longer than 30 s is cut.
METRICS_LIMITS = ServerLimits(max_connections=16, max_per_client=8, idle_timeout_s=10.0, request_timeout_s=30.0)


def families(points: Iterable[MetricPoint]) -> list[FamilySnapshot]:
    """Points grouped into the exposition's families (one family per name, first kind wins)."""
    out: dict[str, FamilySnapshot] = {}
    for p in points:
        fam = out.get(p.name)
        if fam is None:
            fam = out[p.name] = FamilySnapshot(p.name, p.kind, p.unit, p.description, [])
        elif fam.kind is not p.kind:
            raise ValueError(f"metric {p.name} is both {fam.kind} and {p.kind}")
        value: float | HistogramValue = HistogramValue.of(p) if p.kind is MetricKind.HISTOGRAM else p.value
        fam.points.append((p.attributes, value, 0))  # start times: the exposition has none
    return list(out.values())


def proxy_points(runner: Any, now_ns: int | None = None) -> list[MetricPoint]:
    """Every ``flowtel_dnsproxy_*`` point of a running :class:`dnsproxy.run.Runner`."""
    now = time.time_ns() if now_ns is None else now_ns
    proxy = runner.proxy
    datapath = runner.datapath
    out: list[MetricPoint] = []

    def add(name: str, value: float, metric_kind: MetricKind, description: str, **attributes: str) -> None:
        out.append(MetricPoint(PREFIX + name, value, metric_kind, now, attributes, "", description))

    st = proxy.stats_snapshot()
    queries, errors, malformed, learned = st.queries, st.upstream_error_kinds, st.malformed, st.learned_ips
    for verdict in ("allowed", "refused", "audit", "resolver_denied"):
        for protocol in ("udp", "tcp"):
            add("queries_total", queries.get((verdict, protocol), 0), MetricKind.SUM,
                "DNS queries from policed and unpoliced pods by the proxy's decision: allowed (forwarded), "
                "refused (no rules.dns pattern allows the name), audit (not allowed, forwarded by --audit), "
                "resolver_denied (sent to a resolver, port or protocol no DNS rule of the pod allows: dropped, "
                "never forwarded)", verdict=verdict, protocol=protocol)
    add("malformed_queries_total", malformed, MetricKind.SUM, "queries that were not DNS messages (FORMERR or no answer)")
    for reason in REJECT_REASONS:
        add("queries_rejected_total", st.rejected.get(reason, 0), MetricKind.SUM,
            "messages never forwarded for their shape: response (QR set; dropped), opcode (not QUERY; REFUSED), "
            "question_count (not exactly one question; FORMERR), records (answer, authority or additional "
            "records other than EDNS; FORMERR), malformed (not DNS; FORMERR or dropped)", reason=reason)
    for kind in ("timeout", "network", "malformed", "no_upstream"):
        add("upstream_errors_total", errors.get(kind, 0), MetricKind.SUM,
            "allowed queries answered SERVFAIL because the upstream failed: timeout, network (refused, "
            "unreachable, reset), malformed (an answer that is not DNS), no_upstream (sent to the proxy's "
            "own address without --upstream)", kind=kind)
    out.append(st.added_latency.point(PREFIX + "added_latency_seconds", now, unit="s", description=(
        "time the proxy itself adds to a forwarded query: arrival to answer, minus the upstream's time")))
    out.append(st.upstream_latency.point(PREFIX + "upstream_latency_seconds", now, unit="s", description=(
        "time the upstream took to answer a forwarded query (failures excluded)")))
    add("learned_ips_total", learned, MetricKind.SUM,
        ("answer addresses of allowed answers taught to the allow map (one per address of each answer; "
         "a dual-stack pod gets an entry for each of its addresses)"))
    add("learned_ips", datapath.live_allowances, MetricKind.GAUGE,
        "(pod, destination) allowances in the allow map not past their TTL and grace, as of the last clean-up")
    add("policies", len(proxy.policy.policies), MetricKind.GAUGE,
        "policies in effect (accepted), rejected with an error, and accepted but degraded (fields flowtel cannot evaluate, denied instead)", state="accepted")
    add("policies", len(proxy.policy_errors), MetricKind.GAUGE,
        "policies in effect (accepted), rejected with an error, and accepted but degraded (fields flowtel cannot evaluate, denied instead)", state="rejected")
    add("policed_pods", len(proxy.policy.policed_pods()), MetricKind.GAUGE, "pods selected by an egress policy")
    add("policed_interfaces", len(datapath.attached), MetricKind.GAUGE,
        "host-side veths the enforcement program is attached to")
    counters = datapath.counters()
    for decision in ("allowed_fqdn", "allowed_cidr", "allowed_dns", "allowed_reply", "dropped", "audit", "expired"):
        add("datapath_packets_total", counters.get(decision, 0), MetricKind.SUM,
            "packets from policed pods by the datapath's decision (pinned counters: cumulative across proxy "
            "restarts); expired = to a learned address past its deadline (then dropped or audited too)",
            decision=decision)
    add("events_lost_total", counters.get("events_lost", 0), MetricKind.SUM,
        "denied packets the datapath could not record in its fqdn_denied counters (so missing from drop flows)")
    if proxy.flow_log is not None:
        add("flow_log_records_total", proxy.flow_log.written, MetricKind.SUM, "flows written to the --flow-log file")
        for reason, lost in proxy.flow_log.lost_total().items():
            add("flow_log_lost_total", lost, MetricKind.SUM,
                "flows not written to the --flow-log file: queue_full (the writer fell behind; the query path "
                "never waits for it), write_error (the file failed)", reason=reason)
    for counters in getattr(runner, "server_counters", lambda: [])():
        for kind in CLIENT_ERROR_KINDS:
            add("server_client_errors_total", counters.errors.get(kind, 0), MetricKind.SUM,
                "connections of the proxy's TCP DNS, health and metrics servers ended by the client or the bounds: "
                "rejected (over the connection cap), reset, timeout (idle or slow past the deadline), error",
                server=counters.name, kind=kind)
        add("server_connections", counters.open, MetricKind.GAUGE, "open connections per server", server=counters.name)
    for ref in sorted(proxy.policy.degraded):
        add("policy_degraded", 1, MetricKind.GAUGE, "policies with fields flowtel cannot evaluate (denied instead); "
            "the log and the status line name each field", policy=ref)
    add("policies", len(proxy.policy.degraded), MetricKind.GAUGE,
        "policies in effect (accepted), rejected with an error, and accepted but degraded (fields flowtel cannot evaluate, denied instead)", state="degraded")
    add("denied_entries_created_total", datapath.denied_created(), MetricKind.SUM,
        "entries created in the datapath's fqdn_denied map (one per pod, interface, destination, port, "
        "protocol and verdict; an LRU, so a rate well above the drop flows' means evictions)")
    return out


class MetricsServer:
    """``GET /metrics``: the proxy's metrics as Prometheus text (format 0.0.4)."""

    def __init__(self, host: str, port: int, collect: Callable[[], list[MetricPoint]],
                 limits: ServerLimits = METRICS_LIMITS) -> None:
        self.collect = collect
        server = self

        class Handler(BoundedHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?", 1)[0] != "/metrics":
                    self._send(404, "text/plain; charset=utf-8", b"only /metrics here\n")
                    return
                try:
                    body = render(families(server.collect())).encode()
                except Exception as exc:  # a failed reading is a 500 with the reason, not a dead server
                    log.exception("rendering /metrics failed")
                    self._send(500, "text/plain; charset=utf-8", f"{type(exc).__name__}: {exc}\n".encode())
                    return
                self._send(200, CONTENT_TYPE, body)

            def _send(self, code: int, content_type: str, data: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        try:
            self._httpd = BoundedHTTPServer("metrics", (host, port), Handler, limits)
        except OSError as exc:
            why = ("another process holds that port: stop it or pass another --metrics-listen (empty: no metrics)"
                   if exc.errno == errno.EADDRINUSE else "pass an address of this host in --metrics-listen")
            raise StartError("dnsproxy", f"cannot serve metrics on {host}:{port}: {exc.strerror}", why) from None
        self.counters = self._httpd.counters
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self, supervisor: Any = None) -> None:
        if supervisor is not None:  # dnsproxy/supervise.py: a dead metrics server fails /healthz
            self._thread = supervisor.start("dnsproxy-metrics", self._httpd.serve_forever)
            return
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="dnsproxy-metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", *self.address)

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
