"""The DNS proxy: answers policed pods' queries by policy and teaches the datapath.

Queries reach it through the transparent redirect (see dnsproxy/redirect.py), unrewritten:
the source address is the pod's own and identifies it, the destination is the resolver the
pod asked. For each query: a name no rules.dns pattern of the pod's policies allows is
answered REFUSED (or NXDOMAIN); an allowed one is forwarded with a timeout to ``upstream``
when one is configured, else to the resolver the pod asked; the answer's A/AAAA records
reachable from the query name through CNAMEs are written into the pinned allow map, and only
then is the answer released, from the address the pod asked, so the pod's first packet to
the address already finds it allowed.

Decisions and datapath drops are written as Hubble-shaped flows (one JSON per line, the file
exporter's envelope) when a flow log is configured, and counted in :attr:`DnsProxy.stats`.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
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
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from dnsproxy.datapath import VERDICT_AUDIT, DropEvent
from dnsproxy.metrics import ADDED_LATENCY_BOUNDS, UPSTREAM_LATENCY_BOUNDS
from dnsproxy.policy import L4, PolicyError, PolicySet, load_pods, load_policy_dir, normalize_name
from flowtel.histogram import Histogram
from flowtel.hubble import flow_to_dict
from flowtel.records import DnsInfo, Endpoint, Flow, FlowType, TrafficDirection, Verdict

log = logging.getLogger("flowtel.dnsproxy")

DROP_REASON = "POLICY_DENIED"


class Learner(Protocol):
    def learn(self, pod_ips: list[str], dst_ips: list[str], ttl_s: int, grace_s: float, l4: L4) -> None: ...


# Socket options Python's socket module does not name (linux/in.h, linux/in6.h).
_SOL_IP, _SOL_IPV6 = 0, 41
_IP_PKTINFO, _IP_TRANSPARENT, _IP_RECVORIGDSTADDR = 8, 19, 20
_IPV6_RECVORIGDSTADDR, _IPV6_TRANSPARENT = 74, 75
_ANCILLARY_SIZE = socket.CMSG_SPACE(28)  # one sockaddr_in6, the larger of the two


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
    udp_workers: int = 16  # each waits on upstream in turn; the GIL is released while waiting
    node_name: str = field(default_factory=socket.gethostname)


@dataclass
class Stats:
    """Decisions since start; read by tests and status, updated under DnsProxy._stats_lock."""

    allowed: int = 0
    refused: int = 0
    upstream_errors: int = 0
    malformed: int = 0
    learned_ips: int = 0
    latency_ns_sum: int = 0  # time the proxy added per forwarded query (upstream wait included)
    latency_count: int = 0
    # For /metrics (dnsproxy/metrics.py): decisions per (allowed | refused | audit, udp | tcp),
    # upstream failures per kind (timeout | network | malformed | no_upstream), latencies in seconds.
    queries: dict[tuple[str, str], int] = field(default_factory=dict)
    upstream_error_kinds: dict[str, int] = field(default_factory=dict)
    added_latency: Histogram = field(default_factory=lambda: Histogram(ADDED_LATENCY_BOUNDS))
    upstream_latency: Histogram = field(default_factory=lambda: Histogram(UPSTREAM_LATENCY_BOUNDS))


def answer_ips(resp: dns.message.Message, qname: str) -> tuple[list[str], int, list[str]]:
    """A/AAAA addresses of ``qname`` following CNAMEs in the answer section, the smallest TTL
    along the chain (an address is only as fresh as the link that led to it), and the CNAMEs."""
    cnames: dict[str, tuple[str, int]] = {}
    addrs: dict[str, list[tuple[str, int]]] = {}
    for rrset in resp.answer:
        owner = normalize_name(rrset.name.to_text())
        if rrset.rdtype == dns.rdatatype.CNAME:
            cnames[owner] = (normalize_name(rrset[0].target.to_text()), rrset.ttl)
        elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            addrs.setdefault(owner, []).extend((r.address, rrset.ttl) for r in rrset)
    name, ttl, chain, seen = normalize_name(qname), None, [], set()
    while name in cnames and name not in seen and len(seen) < 16:
        seen.add(name)
        name, cttl = cnames[name]
        chain.append(name)
        ttl = cttl if ttl is None else min(ttl, cttl)
    ips = [ip for ip, _ in addrs.get(name, [])]
    for _, t in addrs.get(name, []):
        ttl = t if ttl is None else min(ttl, t)
    return ips, ttl or 0, chain


class DnsProxy:
    def __init__(self, config: ProxyConfig, learner: Learner | None) -> None:
        self.config = config
        self.learner = learner
        self.stats = Stats()
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()  # handlers run on many threads; `+=` is not atomic
        self.policy = PolicySet([], [])
        self.policy_errors: list[str] = []
        self._log_lock = threading.Lock()
        self._flow_log = open(config.flow_log, "a", buffering=1) if config.flow_log else None
        self._servers: list[socketserver.BaseServer] = []
        self._udp: list[socket.socket] = []
        # The proxy's own addresses: a query to one of them was not redirected, and forwarding it
        # to its destination would loop back here.
        self._own = {ipaddress.ip_address(a[0]) for a in (config.listen, config.listen6) if a}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

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
        policy = PolicySet(result.policies, pods)
        with self._lock:
            self.policy, self.policy_errors = policy, result.errors
        log.info("loaded %d policies (%d rejected); %d of %d pods policed", len(result.policies),
                 len(result.errors), len(policy.policed_pods()), len(pods))
        return policy

    # -- queries -----------------------------------------------------------------------------

    def handle(self, wire: bytes, client_ip: str, tcp: bool,
               orig_dst: tuple[str, int] | None = None) -> bytes | None:
        """The answer to send back to the pod for one query message (None: send nothing).

        ``orig_dst`` is the address and port the pod sent the query to (the resolver it asked)."""
        started = time.monotonic_ns()
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            self._count(malformed=1)
            if len(wire) >= 12:
                # Enough for a header: FORMERR, as a resolver would, so the client does not wait.
                (qid,) = struct.unpack("!H", wire[:2])
                return struct.pack("!HHHHHH", qid, 0x8000 | dns.rcode.FORMERR, 0, 0, 0, 0)
            return None
        if not query.question:
            return _rcode_response(query, dns.rcode.FORMERR)
        qname = query.question[0].name.to_text()
        qtype = dns.rdatatype.to_text(query.question[0].rdtype)
        with self._lock:
            policy = self.policy
        pod = policy.pod_by_ip(client_ip)
        policed = pod is not None and policy.is_policed(pod)
        allowed = not policed or policy.dns_allowed(pod, qname)  # type: ignore[arg-type]
        if not allowed and not self.config.audit:
            self._count(refused=1)
            self._decided("refused", tcp)
            resp = _rcode_response(query, self.config.refuse_rcode)
            self._dns_flow(client_ip, qname, qtype, resp, Verdict.DROPPED, 0, orig_dst)
            return resp
        self._decided("allowed" if allowed else "audit", tcp)
        target = self._target(orig_dst)
        if target is None:
            self._count(upstream_errors=1)
            self._upstream_failed("no_upstream")
            log.warning("no upstream for %s from %s: it was sent to the proxy's own address %s, not redirected; "
                        "set --upstream to answer such queries", qname, client_ip, orig_dst[0] if orig_dst else "?")
            return _rcode_response(query, dns.rcode.SERVFAIL)
        asked = time.monotonic_ns()
        try:
            upstream_wire = self._forward(wire, tcp, target)
            resp = dns.message.from_wire(upstream_wire)
        except (OSError, dns.exception.DNSException) as exc:
            self._count(upstream_errors=1)
            self._upstream_failed(_error_kind(exc))
            log.warning("upstream %s:%d failed for %s from %s: %s", *target, qname, client_ip, exc)
            return _rcode_response(query, dns.rcode.SERVFAIL)
        upstream_ns = time.monotonic_ns() - asked
        if policed and self.learner is not None:
            l4 = policy.fqdn_l4(pod, qname)  # type: ignore[arg-type]
            ips, ttl, _ = answer_ips(resp, qname)
            if l4 is not None and ips:
                # Before the answer leaves: the pod's first SYN must find its address allowed.
                self.learner.learn(list(pod.ips), ips, max(ttl, self.config.min_ttl_s),  # type: ignore[union-attr]
                                   self.config.grace_s, l4)
                self._count(learned_ips=len(ips))
        added = time.monotonic_ns() - started
        self._count(allowed=1, latency_ns_sum=added, latency_count=1)
        self.stats.upstream_latency.observe(upstream_ns / 1e9)
        self.stats.added_latency.observe((added - upstream_ns) / 1e9)
        self._dns_flow(client_ip, qname, qtype, upstream_wire,
                       Verdict.AUDIT if not allowed else Verdict.FORWARDED, added, orig_dst)
        return upstream_wire

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

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
                                       upstream_error_kinds=dict(self.stats.upstream_error_kinds))

    def _target(self, orig_dst: tuple[str, int] | None) -> tuple[str, int] | None:
        """Where to forward: the configured upstream, else the resolver the pod asked unless that
        is the proxy itself (a query sent to the proxy directly; forwarding it would loop)."""
        if self.config.upstream is not None:
            return self.config.upstream
        if orig_dst is None or ipaddress.ip_address(orig_dst[0]) in self._own:
            return None
        return orig_dst

    def _forward(self, wire: bytes, tcp: bool, target: tuple[str, int]) -> bytes:
        host, port = target
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if tcp:
            with socket.create_connection((host, port), timeout=self.config.upstream_timeout_s) as s:
                s.sendall(struct.pack("!H", len(wire)) + wire)
                (n,) = struct.unpack("!H", _recv_exact(s, 2))
                return _recv_exact(s, n)
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(self.config.upstream_timeout_s)
            s.connect((host, port))
            s.send(wire)
            deadline = time.monotonic() + self.config.upstream_timeout_s
            while True:
                data = s.recv(65535)
                # Only the answer to this query: same id (a connected socket filters the peer).
                if data[:2] == wire[:2]:
                    return data
                if time.monotonic() > deadline:
                    raise TimeoutError("no matching answer")

    # -- flows -------------------------------------------------------------------------------

    def _write(self, flow: Flow) -> None:
        if self._flow_log is None:
            return
        body = flow_to_dict(flow)
        line = json.dumps({"flow": body, "node_name": flow.node_name, "time": body.get("time")})
        with self._log_lock:
            self._flow_log.write(line + "\n")

    def _endpoint(self, ip: str) -> Endpoint | None:
        pod = self.policy.pod_by_ip(ip)
        if pod is None:
            return None
        return Endpoint(namespace=pod.namespace, pod_name=pod.name,
                        labels=[f"k8s:{k}={v}" for k, v in sorted(pod.labels.items())])

    def _dns_flow(self, client_ip: str, qname: str, qtype: str, resp: bytes, verdict: Verdict,
                  latency_ns: int, orig_dst: tuple[str, int] | None = None) -> None:
        if self._flow_log is None:
            return
        msg = dns.message.from_wire(resp)
        ips, ttl, cnames = answer_ips(msg, qname)
        # The answer's source as the pod sees it: the resolver it asked.
        listen_ip = orig_dst[0] if orig_dst else (
            self.config.listen6[0] if self.config.listen6 and ":" in client_ip else self.config.listen[0])
        self._write(Flow(
            time_ns=time.time_ns(), node_name=self.config.node_name, verdict=verdict,
            ip_version=ipaddress.ip_address(client_ip).version, src_ip=listen_ip, dst_ip=client_ip,
            protocol=17, src_port=53, flow_type=FlowType.L7, traffic_direction=TrafficDirection.EGRESS,
            is_reply=True, drop_reason=DROP_REASON if verdict == Verdict.DROPPED else "",
            l7=DnsInfo(query=qname, qtypes=[qtype], rcode=msg.rcode(), ips=ips, ttl=ttl, cnames=cnames,
                       observation_source="proxy"),
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
        """Start the UDP and TCP listeners (IPv4, and IPv6 when configured) on their own threads.

        Every socket is transparent (IP_TRANSPARENT / IPV6_TRANSPARENT): the redirect hands it
        packets addressed to other hosts (the resolvers pods asked), and it answers from those
        addresses. That needs CAP_NET_ADMIN, which the proxy has anyway for tc and nftables."""
        proxy = self
        listens = [a for a in (self.config.listen, self.config.listen6) if a]

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                conn.settimeout(10)
                # A redirected connection keeps the resolver the pod asked as its local address.
                orig = conn.getsockname()[:2]
                try:
                    while True:  # several queries may share one connection (RFC 7766)
                        head = _recv_exact(conn, 2)
                        (n,) = struct.unpack("!H", head)
                        resp = proxy.handle(_recv_exact(conn, n), self.client_address[0], tcp=True, orig_dst=orig)
                        if resp is None:
                            return
                        conn.sendall(struct.pack("!H", len(resp)) + resp)
                except (OSError, EOFError):
                    return

        class TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def server_bind(self) -> None:
                _make_transparent(self.socket)
                super().server_bind()

        for host, port in listens:
            v6 = ":" in host
            family = socket.AF_INET6 if v6 else socket.AF_INET
            server = type("TcpServer", (TcpServer,), {"address_family": family})((host, port), Tcp)
            self._servers.append(server)
            t = threading.Thread(target=server.serve_forever, name=f"dnsproxy-tcp{'6' if v6 else ''}", daemon=True)
            t.start()
            self._threads.append(t)
            # UDP: a fixed pool of workers on each socket, not a thread per datagram (measured
            # with dnsproxy/bench.py: thread creation dominated the cost of a query).
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            _make_transparent(sock)
            # The destination each datagram had before the redirect: the resolver the pod asked.
            if v6:
                sock.setsockopt(_SOL_IPV6, _IPV6_RECVORIGDSTADDR, 1)
            else:
                sock.setsockopt(_SOL_IP, _IP_RECVORIGDSTADDR, 1)
            sock.bind((host, port))
            sock.settimeout(0.5)  # so workers notice shutdown
            self._udp.append(sock)
            for i in range(self.config.udp_workers):
                t = threading.Thread(target=self._udp_worker, args=(sock, (host, port)),
                                     name=f"dnsproxy-udp{'6' if v6 else ''}-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        upstream = "%s:%d" % self.config.upstream if self.config.upstream else "the resolver each query was sent to"
        log.info("DNS proxy listening on %s (UDP, TCP), forwarding to %s",
                 ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in listens), upstream)

    def _udp_worker(self, sock: socket.socket, bound: tuple[str, int]) -> None:
        v6 = sock.family == socket.AF_INET6
        while not self._stopping.is_set():
            try:
                data, ancdata, _flags, peer = sock.recvmsg(65535, _ANCILLARY_SIZE)
            except TimeoutError:
                continue
            except OSError:
                return  # socket closed at shutdown
            try:
                orig = _orig_dst(ancdata) or bound
                resp = self.handle(data, peer[0], tcp=False, orig_dst=orig)
                if resp is not None:
                    # From the address the pod asked, or it would discard the answer.
                    sock.sendmsg([resp], [_pktinfo(orig[0], v6)], 0, peer)
            except Exception:  # one bad exchange must not take a worker away
                log.exception("handling a UDP query from %s", peer[0])

    def shutdown(self) -> None:
        self._stopping.set()
        for t in self._threads:
            if t.name.startswith("dnsproxy-udp"):
                t.join(2)
        for sock in self._udp:
            sock.close()
        for s in self._servers:
            s.shutdown()
            s.server_close()
        if self._flow_log is not None:
            self._flow_log.close()


def _make_transparent(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(_SOL_IPV6, _IPV6_TRANSPARENT, 1)
        sock.setsockopt(_SOL_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own socket
    else:
        sock.setsockopt(_SOL_IP, _IP_TRANSPARENT, 1)


def _orig_dst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """(address, port) from an IP_ORIGDSTADDR / IPV6_ORIGDSTADDR message (a sockaddr_in[6])."""
    for level, kind, data in ancdata:
        if level == _SOL_IP and kind == _IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), struct.unpack("!H", data[2:4])[0]
        if level == _SOL_IPV6 and kind == _IPV6_RECVORIGDSTADDR and len(data) >= 24:
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), struct.unpack("!H", data[2:4])[0]
    return None


def _pktinfo(src: str, v6: bool) -> tuple[int, int, bytes]:
    """Ancillary data choosing a datagram's source address (in_pktinfo / in6_pktinfo, any interface)."""
    if v6:
        return _SOL_IPV6, socket.IPV6_PKTINFO, socket.inet_pton(socket.AF_INET6, src) + struct.pack("=I", 0)
    return _SOL_IP, _IP_PKTINFO, struct.pack("=I", 0) + socket.inet_pton(socket.AF_INET, src) + bytes(4)


def _error_kind(exc: BaseException) -> str:
    """An upstream failure's kind for /metrics: timeout, network, or malformed (not DNS)."""
    if isinstance(exc, (TimeoutError, dns.exception.Timeout)):
        return "timeout"
    if isinstance(exc, OSError):
        return "network"
    return "malformed"


def _rcode_response(query: dns.message.Message, rcode: int) -> bytes:
    resp = dns.message.make_response(query)
    resp.set_rcode(rcode)
    return resp.to_wire()


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

