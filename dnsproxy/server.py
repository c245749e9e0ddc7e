"""The DNS proxy: answers policed pods' queries by policy and teaches the datapath.

Queries reach it through the transparent redirect (see dnsproxy/redirect.py), unrewritten:
the source address is the pod's own and identifies it, the destination is the resolver the
pod asked. For each query: a name no rules.dns pattern of the pod's policies allows is
answered REFUSED (or NXDOMAIN); an allowed one is forwarded with a timeout to ``upstream``
when one is configured, else to the resolver the pod asked; the answer's A/AAAA records
reachable from the query name through CNAMEs are written into the pinned allow map, and only
then is the answer released, from the address the pod asked, so the pod's first packet to
the address already finds it allowed.

UDP queries are served by one event loop (dnsproxy/udp.py) that keeps every query waiting for
its upstream in flight at once; TCP connections each get a thread. What a query costs in CPU
is mostly dnspython reading messages, so what it read is kept per distinct message
(dnsproxy/wire.py) and the policy's decision per (client, name) per policy view.

Decisions and datapath drops are written as Hubble-shaped flows (one JSON per line, the file
exporter's envelope, by a writer thread: dnsproxy/flowlog.py) when a flow log is configured,
and counted in :attr:`DnsProxy.stats`.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import dns.exception
import dns.rcode

from dnsproxy.bounded import BoundedThreadingMixIn, ServerCounters, ServerLimits, error_kind
from dnsproxy.datapath import VERDICT_AUDIT, DropEvent
from dnsproxy.flowlog import FlowLogWriter
from dnsproxy.metrics import ADDED_LATENCY_BOUNDS, UPSTREAM_LATENCY_BOUNDS
from dnsproxy.supervise import Supervisor
from flowtel.lib.policy import L4, Pod, PolicyError, PolicySet, load_pods, load_policy_dir, load_services
from dnsproxy.udp import UdpLoop, make_transparent, udp_listen_socket
# Re-exported: these lived here before dnsproxy/udp.py and dnsproxy/wire.py, and are imported from here.
from dnsproxy.udp import orig_dst as _orig_dst, pktinfo as _pktinfo  # noqa: F401
from dnsproxy.wire import (REJECT_REASONS, Answer, BadQuery, BoundedCache, Query, QuestionKey,  # noqa: F401
                           answer_ips, header_only_formerr, header_only_response, parse_answer, parse_query)
from flowtel.histogram import Histogram
from flowtel.records import DnsInfo, Endpoint, Flow, FlowType, TrafficDirection, Verdict

log = logging.getLogger("flowtel.dnsproxy")

DROP_REASON = "POLICY_DENIED"


class Learner(Protocol):
    def learn(self, pod_ips: list[str], dst_ips: list[str], ttl_s: int, grace_s: float, l4: L4) -> None: ...


@dataclass
class ProxyConfig:
    policies_dir: str
    pods_file: str
    # Forward every allowed query here (node-local cache setups); None: to the resolver the pod asked.
    upstream: tuple[str, int] | None
    listen: tuple[str, int] = ("169.254.20.53", 53)
    listen6: tuple[str, int] | None = None  # the IPv6 socket (redirected IPv6 DNS); None: IPv4 only
    refuse_rcode: int = dns.rcode.REFUSED  # or NXDOMAIN, as Cilium's tofqdns-dns-reject-response-code
    upstream_timeout_s: float = 2.0
    min_ttl_s: int = 0
    grace_s: float = 0.0
    audit: bool = False
    flow_log: str | None = None
    # UDP queries waiting for their upstream at once (each holds a socket); beyond it the loop
    # stops reading new queries until answers come back, and they wait in the socket's buffer.
    max_in_flight: int = 4096
    # DNS over TCP: a thread per connection, so connections are capped (in all and per pod) and
    # each must send its next message within idle_timeout_s and all of it within request_timeout_s.
    tcp_limits: ServerLimits = field(default_factory=lambda: ServerLimits(
        max_connections=256, max_per_client=16, idle_timeout_s=10.0, request_timeout_s=5.0))
    node_name: str = field(default_factory=socket.gethostname)
    services_file: str = ""  # --services (without --kube)


@dataclass
class Stats:
    """Decisions since start; read by tests and status, updated under DnsProxy._stats_lock."""

    allowed: int = 0
    refused: int = 0
    upstream_errors: int = 0
    malformed: int = 0
    # Queries not forwarded because of their shape (dnsproxy/wire.py REJECT_REASONS), per reason,
    # and queries to a resolver no DNS rule of the pod allows (dropped, never forwarded).
    rejected: dict[str, int] = field(default_factory=dict)
    resolver_denied: int = 0
    learned_ips: int = 0
    latency_ns_sum: int = 0  # time the proxy added per forwarded query (upstream wait included)
    latency_count: int = 0
    # For /metrics (dnsproxy/metrics.py): decisions per (allowed | refused | audit, udp | tcp),
    # upstream failures per kind (timeout | network | malformed | no_upstream), latencies in seconds.
    queries: dict[tuple[str, str], int] = field(default_factory=dict)
    upstream_error_kinds: dict[str, int] = field(default_factory=dict)
    added_latency: Histogram = field(default_factory=lambda: Histogram(ADDED_LATENCY_BOUNDS))
    upstream_latency: Histogram = field(default_factory=lambda: Histogram(UPSTREAM_LATENCY_BOUNDS))


@dataclass(slots=True)
class Forward:
    """An allowed query on its way upstream: what its answer needs when it comes back."""

    wire: bytes
    query: Query
    client_ip: str
    tcp: bool
    orig_dst: tuple[str, int] | None
    target: tuple[str, int]
    pod: Pod | None
    policed: bool
    allowed: bool  # False: not allowed, forwarded because of --audit
    l4: L4 | None  # ports the answer's addresses open (None: no toFQDNs rule matches the name)
    started_ns: int
    view: PolicySet | None = None  # the policy view that decided: whose pods learn the answer
    asked_ns: int = 0  # when it left for the upstream


# pod, policed, verdict (True: allowed, False: name refused, None: resolver not allowed), ports
# learned addresses open
Decision = tuple[Pod | None, bool, bool | None, L4 | None]
# Decisions kept per policy view; a view is replaced as a whole on every reload, which drops them.
DECISION_CACHE_ENTRIES = 4096
# Failures of a reachable upstream (timeouts, errors) are logged at most this often (seconds),
# with the number left unlogged: an upstream that stops answering at thousands of queries per
# second must not turn the proxy's CPU into log lines. Every failure is counted either way.
FAILURE_LOG_INTERVAL_S = 5.0


class DnsProxy:
    def __init__(self, config: ProxyConfig, learner: Learner | None, supervisor: Supervisor | None = None) -> None:
        self.config = config
        self.supervisor = supervisor if supervisor is not None else Supervisor()
        self.learner = learner
        self.stats = Stats()
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()  # the UDP loop and the TCP handlers both count; `+=` is not atomic
        self.policy = PolicySet([], [])
        self.policy_errors: list[str] = []
        self._decisions: tuple[PolicySet | None, BoundedCache[tuple[Any, ...], Decision]] = (
            None, BoundedCache(DECISION_CACHE_ENTRIES))
        # Written by a thread of its own (dnsproxy/flowlog.py): the query path only queues a record.
        self.flow_log = FlowLogWriter(config.flow_log, autostart=False) if config.flow_log else None
        self._servers: list[socketserver.BaseServer] = []
        self._udp_loop: UdpLoop | None = None
        # The proxy's own addresses: a query to one of them was not redirected, and forwarding it
        # to its destination would loop back here.
        self._own = {ipaddress.ip_address(a[0]) for a in (config.listen, config.listen6) if a}
        self._own_text: dict[str, bool] = {}  # address as the socket reported it -> in _own
        self._threads: list[threading.Thread] = []
        self._failure_log_next = 0.0
        self._failures_unlogged = 0

    # -- policy ------------------------------------------------------------------------------

    def reload(self) -> PolicySet:
        """Read the policy directory and the pods file again; bad policies are reported and skipped."""
        result = load_policy_dir(self.config.policies_dir)
        for err in result.errors:
            log.error("policy rejected: %s", err)
        try:
            pods = load_pods(self.config.pods_file)
        except PolicyError as exc:
            log.error("%s; keeping the previous pods", exc)
            pods = self.policy.pods
        services = self.policy.services
        if self.config.services_file:
            try:
                services = tuple(load_services(self.config.services_file))
            except PolicyError as exc:
                log.error("%s; keeping the previous services", exc)
        policy = PolicySet(result.policies, pods, services=services)
        with self._lock:
            self.policy, self.policy_errors = policy, result.errors
        log.info("loaded %d policies (%d rejected); %d of %d pods policed", len(result.policies),
                 len(result.errors), len(policy.policed_pods()), len(pods))
        return policy

    # -- queries -----------------------------------------------------------------------------
    #
    # A query goes through three steps, so that the UDP event loop (dnsproxy/udp.py) can wait
    # for many upstream answers at once while TCP handlers and tests call :meth:`handle`:
    # :meth:`begin` decides (an immediate answer, or a :class:`Forward`), the upstream is asked,
    # then :meth:`finish` (learn, count, release) or :meth:`fail` (SERVFAIL) gives the answer.

    def handle(self, wire: bytes, client_ip: str, tcp: bool,
               orig_dst: tuple[str, int] | None = None) -> bytes | None:
        """The answer to send back to the pod for one query message (None: send nothing),
        waiting for the upstream on this thread.

        ``orig_dst`` is the address and port the pod sent the query to (the resolver it asked)."""
        step = self.begin(wire, client_ip, tcp, orig_dst)
        if not isinstance(step, Forward):
            return step
        step.asked_ns = time.monotonic_ns()
        try:
            upstream_wire, answer = self._exchange(step)
        except (OSError, dns.exception.DNSException) as exc:
            return self.fail(step, exc)
        return self.finish(step, upstream_wire, answer)

    def begin(self, wire: bytes, client_ip: str, tcp: bool,
              orig_dst: tuple[str, int] | None = None) -> bytes | None | Forward:
        """Decide a query: the answer to send at once (FORMERR, REFUSED/NXDOMAIN, SERVFAIL when
        there is nowhere to forward; None: nothing to answer), or the :class:`Forward` to send."""
        started = time.monotonic_ns()
        try:
            query = parse_query(wire)
        except BadQuery as exc:
            # Never forwarded: a response (dropped: answering would start a reflection loop),
            # another opcode (REFUSED), other than one question or records riding along (FORMERR).
            self._rejected(exc.reason)
            return None if exc.rcode is None else header_only_response(wire, exc.rcode)
        except dns.exception.DNSException:
            self._count(malformed=1)
            self._rejected("malformed")
            return header_only_formerr(wire)  # as a resolver would, so the client does not wait
        if query.question is None:  # parse_query admits exactly one question; kept for safety
            return query.rcode_response(wire[:2], dns.rcode.FORMERR)
        view = self.policy
        pod, policed, verdict, l4 = self._decide(view, client_ip, query.question, orig_dst, tcp)
        if verdict is None and not self.config.audit:
            # A resolver (or port, or protocol) no DNS rule of the pod allows: the datapath drops
            # these before they reach the proxy; one that still arrives (a rule just changed) is
            # dropped here too, never forwarded, never answered.
            self._count(resolver_denied=1)
            self._decided("resolver_denied", tcp)
            self._dns_flow(client_ip, query, self.config.refuse_rcode, (), 0, (), Verdict.DROPPED, 0, orig_dst)
            return None
        allowed = verdict is True
        if not allowed and not self.config.audit:
            self._count(refused=1)
            self._decided("refused", tcp)
            self._dns_flow(client_ip, query, self.config.refuse_rcode, (), 0, (), Verdict.DROPPED, 0, orig_dst)
            return query.rcode_response(wire[:2], self.config.refuse_rcode)
        self._decided("allowed" if allowed else "audit", tcp)
        target = self._target(orig_dst)
        if target is None:
            self._count(upstream_errors=1)
            self._upstream_failed("no_upstream")
            log.warning("no upstream for %s from %s: it was sent to the proxy's own address %s, not redirected; "
                        "set --upstream to answer such queries", query.qname, client_ip, orig_dst[0] if orig_dst else "?")
            return query.rcode_response(wire[:2], dns.rcode.SERVFAIL)
        return Forward(wire, query, client_ip, tcp, orig_dst, target, pod, policed, allowed, l4, started, view=view)

    def match(self, fwd: Forward, upstream_wire: bytes) -> Answer | None:
        """The upstream's answer to ``fwd`` read from ``upstream_wire``, or None if the datagram
        answers something else (another ID or question: stray or spoofed, to be ignored).
        ``dns.exception.DNSException`` if it is not DNS at all."""
        if upstream_wire[:2] != fwd.wire[:2]:
            return None
        answer = parse_answer(upstream_wire)
        return answer if answer.answers(fwd.query) else None

    def finish(self, fwd: Forward, upstream_wire: bytes, answer: Answer) -> bytes:
        """The upstream answered: learn its addresses for the pod, then release it."""
        upstream_ns = time.monotonic_ns() - fwd.asked_ns
        if fwd.policed and fwd.allowed and self.learner is not None and answer.ips:
            # Before the answer leaves: the pod's first SYN must find its address allowed. Every
            # policed pod whose toFQDNs select the name learns it, as Cilium shares addresses by
            # selector across the node; only answers of allowed resolvers to allowed questions.
            view = fwd.view or self.policy
            ttl = max(answer.ttl, self.config.min_ttl_s)
            learners = view.fqdn_learners(fwd.query.question[0]) if fwd.query.question else ()
            for pod_ips, l4 in learners:
                self.learner.learn(list(pod_ips), list(answer.ips), ttl, self.config.grace_s, l4)
            if learners:
                self._count(learned_ips=len(answer.ips))
        added = time.monotonic_ns() - fwd.started_ns
        st = self.stats
        with self._stats_lock:
            st.allowed += 1
            st.latency_ns_sum += added
            st.latency_count += 1
        st.upstream_latency.observe(upstream_ns / 1e9)
        st.added_latency.observe((added - upstream_ns) / 1e9)
        self._dns_flow(fwd.client_ip, fwd.query, answer.rcode, answer.ips, answer.ttl, answer.cnames,
                       Verdict.FORWARDED if fwd.allowed else Verdict.AUDIT, added, fwd.orig_dst)
        return upstream_wire

    def fail(self, fwd: Forward, exc: BaseException) -> bytes:
        """The upstream did not answer usably: SERVFAIL, counted by kind."""
        self._count(upstream_errors=1)
        self._upstream_failed(_error_kind(exc))
        self._log_failure("upstream %s:%d failed for %s from %s: %s", *fwd.target, fwd.query.qname, fwd.client_ip,
                          str(exc) or type(exc).__name__)
        return fwd.query.rcode_response(fwd.wire[:2], dns.rcode.SERVFAIL)

    def _decide(self, policy: PolicySet, client_ip: str, question: QuestionKey, orig_dst: tuple[str, int] | None,
                tcp: bool) -> Decision:
        """Policy for (client, name, resolver, protocol), computed once per policy view: a pod
        asks the same names of the same resolver again and again, and the view is immutable
        until the next reload swaps it."""
        view, cache = self._decisions
        if view is not policy:
            cache = BoundedCache(DECISION_CACHE_ENTRIES)
            self._decisions = (policy, cache)
        key = (client_ip, question, orig_dst, tcp)
        hit = cache.get(key)
        if hit is not None:
            return hit
        qname = question[0]
        pod = policy.pod_by_ip(client_ip)
        policed = pod is not None and policy.is_policed(pod)
        verdict: bool | None = True
        if policed:
            # A query without its original destination (not redirected) names no resolver a rule
            # could allow: the proxy's own address stands for it, which no rule selects.
            resolver, port = orig_dst if orig_dst is not None else (self.config.listen[0], self.config.listen[1])
            verdict = policy.dns_verdict(pod, qname, resolver, port, 6 if tcp else 17)  # type: ignore[arg-type]
        l4 = policy.fqdn_l4(pod, qname) if policed else None  # type: ignore[arg-type]
        decision = (pod, policed, verdict, l4)
        cache.put(key, decision)
        return decision

    def _log_failure(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        with self._stats_lock:
            if now < self._failure_log_next:
                self._failures_unlogged += 1
                return
            unlogged, self._failures_unlogged = self._failures_unlogged, 0
            self._failure_log_next = now + FAILURE_LOG_INTERVAL_S
        if unlogged:
            fmt += " (and %d more failures since the previous such line)"
            args = (*args, unlogged)
        log.warning(fmt, *args)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def _rejected(self, reason: str) -> None:
        with self._stats_lock:
            self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1

    def _decided(self, verdict: str, tcp: bool) -> None:
        key = (verdict, "tcp" if tcp else "udp")
        with self._stats_lock:
            self.stats.queries[key] = self.stats.queries.get(key, 0) + 1

    def _upstream_failed(self, kind: str) -> None:
        with self._stats_lock:
            self.stats.upstream_error_kinds[kind] = self.stats.upstream_error_kinds.get(kind, 0) + 1

    def stats_snapshot(self) -> Stats:
        """A consistent copy of the counters (the histograms are shared: they lock themselves)."""
        with self._stats_lock:
            return dataclasses.replace(self.stats, queries=dict(self.stats.queries),
                                       upstream_error_kinds=dict(self.stats.upstream_error_kinds),
                                       rejected=dict(self.stats.rejected))

    def _target(self, orig_dst: tuple[str, int] | None) -> tuple[str, int] | None:
        """Where to forward: the configured upstream, else the resolver the pod asked unless that
        is the proxy itself (a query sent to the proxy directly; forwarding it would loop)."""
        if self.config.upstream is not None:
            return self.config.upstream
        if orig_dst is None:
            return None
        own = self._own_text.get(orig_dst[0])
        if own is None:  # parsed once per address: any spelling of an IPv6 address is the same address
            own = ipaddress.ip_address(orig_dst[0]) in self._own
            if len(self._own_text) < 1024:
                self._own_text[orig_dst[0]] = own
        return None if own else orig_dst

    def _exchange(self, fwd: Forward) -> tuple[bytes, Answer]:
        """Ask the upstream and wait for its answer on this thread (TCP handlers, tests)."""
        host, port = fwd.target
        wire, timeout = fwd.wire, self.config.upstream_timeout_s
        if fwd.tcp:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.sendall(struct.pack("!H", len(wire)) + wire)
                try:
                    (n,) = struct.unpack("!H", _recv_exact(s, 2))
                    data = _recv_exact(s, n)
                except EOFError as exc:  # a network failure (SERVFAIL), not the pod's connection ending
                    raise ConnectionResetError("the upstream closed the connection before answering") from exc
            answer = self.match(fwd, data)
            if answer is None:  # one exchange per connection: anything else is a broken upstream
                raise dns.exception.FormError("the upstream's answer does not match the query")
            return data, answer
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect((host, port))  # a connected socket takes datagrams from the upstream only
            s.send(wire)
            deadline = time.monotonic() + timeout
            while True:
                data = s.recv(65535)
                answer = self.match(fwd, data)
                if answer is not None:
                    return data, answer
                if time.monotonic() > deadline:
                    raise TimeoutError("no matching answer")

    # -- flows -------------------------------------------------------------------------------

    def _write(self, flow: Flow) -> None:
        if self.flow_log is not None:
            self.flow_log.write(flow)

    def _endpoint(self, ip: str) -> Endpoint | None:
        pod = self.policy.pod_by_ip(ip)
        if pod is None:
            return None
        return Endpoint(namespace=pod.namespace, pod_name=pod.name,
                        labels=[f"k8s:{k}={v}" for k, v in sorted(pod.labels.items())])

    def _dns_flow(self, client_ip: str, query: Query, rcode: int, ips: tuple[str, ...], ttl: int,
                  cnames: tuple[str, ...], verdict: Verdict, latency_ns: int,
                  orig_dst: tuple[str, int] | None = None) -> None:
        if self.flow_log is None:
            return
        # The answer's source as the pod sees it: the resolver it asked.
        listen_ip = orig_dst[0] if orig_dst else (
            self.config.listen6[0] if self.config.listen6 and ":" in client_ip else self.config.listen[0])
        self._write(Flow(
            time_ns=time.time_ns(), node_name=self.config.node_name, verdict=verdict,
            ip_version=ipaddress.ip_address(client_ip).version, src_ip=listen_ip, dst_ip=client_ip,
            protocol=17, src_port=53, flow_type=FlowType.L7, traffic_direction=TrafficDirection.EGRESS,
            is_reply=True, drop_reason=DROP_REASON if verdict == Verdict.DROPPED else "",
            l7=DnsInfo(query=query.qname, qtypes=[query.qtype], rcode=rcode, ips=list(ips), ttl=ttl,
                       cnames=list(cnames), observation_source="proxy"),
            l7_type="RESPONSE", latency_ns=latency_ns, destination=self._endpoint(client_ip),
            extensions={"dnsproxy": True}))

    def on_drop(self, ev: DropEvent) -> None:
        """A datapath event: a flow with verdict DROPPED (or AUDIT) and reason POLICY_DENIED."""
        verdict = Verdict.AUDIT if ev.verdict == VERDICT_AUDIT else Verdict.DROPPED
        log.info("%s %s:%d -> %s:%d proto %d", verdict, ev.src_ip, ev.src_port, ev.dst_ip, ev.dst_port, ev.protocol)
        wall = time.time_ns() - time.monotonic_ns() + ev.ts_ns
        self._write(Flow(
            time_ns=wall, node_name=self.config.node_name, verdict=verdict, ip_version=ev.family,
            src_ip=ev.src_ip, dst_ip=ev.dst_ip, protocol=ev.protocol, src_port=ev.src_port, dst_port=ev.dst_port,
            ethertype=0x0800 if ev.family == 4 else 0x86DD, traffic_direction=TrafficDirection.EGRESS,
            is_reply=False, ifindex=ev.ifindex, packets=ev.packets, bytes=ev.length, tcp_flags=ev.tcp_flags,
            drop_reason=DROP_REASON, source=self._endpoint(ev.src_ip)))

    # -- serving -----------------------------------------------------------------------------

    def serve(self) -> None:
        """Start the listeners: one event loop for UDP (both families), a thread per TCP connection.

        Every socket is transparent (IP_TRANSPARENT / IPV6_TRANSPARENT): the redirect hands it
        packets addressed to other hosts (the resolvers pods asked), and it answers from those
        addresses. That needs CAP_NET_ADMIN, which the proxy has anyway for tc and nftables."""
        proxy = self
        listens = [a for a in (self.config.listen, self.config.listen6) if a]

        limits = self.config.tcp_limits

        class Tcp(socketserver.BaseRequestHandler):
            server: TcpServer

            def handle(self) -> None:
                conn: socket.socket = self.request
                # A redirected connection keeps the resolver the pod asked as its local address.
                orig = conn.getsockname()[:2]
                try:
                    while True:  # several queries may share one connection (RFC 7766)
                        # Idle between messages up to idle_timeout_s; then the whole message,
                        # length prefix included, within message_timeout_s however it drips.
                        first = _recv_until(conn, 1, time.monotonic() + limits.idle_timeout_s, idle=True)
                        if not first:
                            return  # closed between messages: a normal end
                        deadline = time.monotonic() + limits.request_timeout_s
                        head = first + _recv_until(conn, 1, deadline)
                        (n,) = struct.unpack("!H", head)
                        resp = proxy.handle(_recv_until(conn, n, deadline), self.client_address[0], tcp=True,
                                            orig_dst=orig)
                        if resp is None:
                            return
                        conn.settimeout(limits.request_timeout_s)
                        conn.sendall(struct.pack("!H", len(resp)) + resp)
                except (OSError, EOFError) as exc:
                    self.server.counters.count(error_kind(exc))

        class TcpServer(BoundedThreadingMixIn, socketserver.TCPServer):
            allow_reuse_address = True
            request_queue_size = 128

            def server_bind(self) -> None:
                make_transparent(self.socket)
                super().server_bind()

        udp: list[tuple[socket.socket, tuple[str, int]]] = []
        for host, port in listens:
            v6 = ":" in host
            family = socket.AF_INET6 if v6 else socket.AF_INET
            server = type("TcpServer", (TcpServer,), {"address_family": family})((host, port), Tcp, False)
            server.init_bounds(f"dns-tcp{'6' if v6 else ''}", limits)
            try:
                server.server_bind()
                server.server_activate()
            except OSError:
                server.server_close()
                raise
            self._servers.append(server)
            self._threads.append(self.supervisor.start(f"dnsproxy-tcp{'6' if v6 else ''}", server.serve_forever))
            sock = udp_listen_socket(host, port)
            udp.append((sock, (host, port)))
        self._udp_loop = UdpLoop(self, udp, self.config.upstream_timeout_s, self.config.max_in_flight)
        self._threads.append(self.supervisor.start("dnsproxy-udp", self._udp_loop.run))
        if self.flow_log is not None:
            self.flow_log.start(self.supervisor)
        upstream = "%s:%d" % self.config.upstream if self.config.upstream else "the resolver each query was sent to"
        log.info("DNS proxy listening on %s (UDP, TCP), forwarding to %s",
                 ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in listens), upstream)

    def server_counters(self) -> list[ServerCounters]:
        return [s.counters for s in self._servers if isinstance(s, BoundedThreadingMixIn)]

    def shutdown(self) -> None:
        self.supervisor.stopping = True
        if self._udp_loop is not None:
            self._udp_loop.stop()
        for t in self._threads:
            if t.name == "dnsproxy-udp":
                t.join(2)
        for s in self._servers:
            s.shutdown()
            s.server_close()
        if self.flow_log is not None:
            self.flow_log.close()


def _error_kind(exc: BaseException) -> str:
    """An upstream failure's kind for /metrics: timeout, network, or malformed (not DNS)."""
    if isinstance(exc, (TimeoutError, dns.exception.Timeout)):
        return "timeout"
    if isinstance(exc, OSError):
        return "network"
    return "malformed"


def _recv_until(s: socket.socket, n: int, deadline: float, idle: bool = False) -> bytes:
    """``n`` bytes by ``deadline`` (TimeoutError past it). With ``idle``, a connection closed
    before the first byte returns b"" (the client is done) instead of raising EOFError."""
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client sent too slowly")
        s.settimeout(left)
        chunk = s.recv(n - len(buf))
        if not chunk:
            if idle and not buf:
                return b""
            raise EOFError("connection closed")
        buf += chunk
    return buf


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def snapshot(paths: list[str]) -> tuple[Any, ...]:
    """What changes when a policy or the pods file changes: names, sizes and mtimes."""
    out = []
    for p in paths:
        path = Path(p)
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        for f in files:
            try:
                st = f.stat()
                out.append((str(f), st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append((str(f), 0, 0))
    return tuple(out)

