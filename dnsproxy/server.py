"""The DNS proxy: answers policed pods' queries by policy and teaches the datapath.

Queries reach it through the datapath's DNAT (see dnsproxy/datapath.py), so the source
address is the pod's own and identifies it. For each query: a name no rules.dns pattern of the
pod's policies allows is answered REFUSED (or NXDOMAIN); an allowed one is forwarded to the
upstream with a timeout, the answer's A/AAAA records reachable from the query name through
CNAMEs are written into the pinned allow map, and only then is the answer released, so the
pod's first packet to the address already finds it allowed.

Decisions and datapath drops are written as Hubble-shaped flows (one JSON per line, the file
exporter's envelope) when a flow log is configured, and counted in :attr:`DnsProxy.stats`.
"""
from __future__ import annotations

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
from dnsproxy.policy import L4, PolicyError, PolicySet, load_pods, load_policy_dir, normalize_name
from flowtel.hubble import flow_to_dict
from flowtel.records import DnsInfo, Endpoint, Flow, FlowType, TrafficDirection, Verdict

log = logging.getLogger("flowtel.dnsproxy")

DROP_REASON = "POLICY_DENIED"


class Learner(Protocol):
    def learn(self, pod_ips: list[str], dst_ips: list[str], ttl_s: int, grace_s: float, l4: L4) -> None: ...


@dataclass
class ProxyConfig:
    policies_dir: str
    pods_file: str
    upstream: tuple[str, int]
    listen: tuple[str, int] = ("169.254.20.53", 53)
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
        self._udp: socket.socket | None = None
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

    def handle(self, wire: bytes, client_ip: str, tcp: bool) -> bytes | None:
        """The answer to send back to the pod for one query message (None: send nothing)."""
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
            resp = _rcode_response(query, self.config.refuse_rcode)
            self._dns_flow(client_ip, qname, qtype, resp, Verdict.DROPPED, 0)
            return resp
        try:
            upstream_wire = self._forward(wire, tcp)
            resp = dns.message.from_wire(upstream_wire)
        except (OSError, dns.exception.DNSException) as exc:
            self._count(upstream_errors=1)
            log.warning("upstream %s:%d failed for %s from %s: %s", *self.config.upstream, qname, client_ip, exc)
            return _rcode_response(query, dns.rcode.SERVFAIL)
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
        self._dns_flow(client_ip, qname, qtype, upstream_wire,
                       Verdict.AUDIT if not allowed else Verdict.FORWARDED, added)
        return upstream_wire

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def _forward(self, wire: bytes, tcp: bool) -> bytes:
        host, port = self.config.upstream
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
                  latency_ns: int) -> None:
        if self._flow_log is None:
            return
        msg = dns.message.from_wire(resp)
        ips, ttl, cnames = answer_ips(msg, qname)
        listen_ip = self.config.listen[0]
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
            is_reply=False, ifindex=ev.ifindex, packets=1, bytes=ev.length, tcp_flags=ev.tcp_flags,
            drop_reason=DROP_REASON, source=self._endpoint(ev.src_ip)))

    # -- serving -----------------------------------------------------------------------------

    def serve(self) -> None:
        """Start the UDP and TCP listeners on their own threads."""
        proxy = self
        host, port = self.config.listen

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                conn.settimeout(10)
                try:
                    while True:  # several queries may share one connection (RFC 7766)
                        head = _recv_exact(conn, 2)
                        (n,) = struct.unpack("!H", head)
                        resp = proxy.handle(_recv_exact(conn, n), self.client_address[0], tcp=True)
                        if resp is None:
                            return
                        conn.sendall(struct.pack("!H", len(resp)) + resp)
                except (OSError, EOFError):
                    return

        class TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            allow_reuse_address = True

        server = TcpServer((host, port), Tcp)
        self._servers.append(server)
        t = threading.Thread(target=server.serve_forever, name="dnsproxy-tcp", daemon=True)
        t.start()
        self._threads.append(t)
        # UDP: a fixed pool of workers on one socket, not a thread per datagram (measured with
        # dnsproxy/bench.py: thread creation dominated the cost of a query).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._udp = socket.socket(family, socket.SOCK_DGRAM)
        self._udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._udp.bind((host, port))
        self._udp.settimeout(0.5)  # so workers notice shutdown
        for i in range(self.config.udp_workers):
            t = threading.Thread(target=self._udp_worker, name=f"dnsproxy-udp-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("DNS proxy listening on %s:%d (UDP, TCP), upstream %s:%d", host, port, *self.config.upstream)

    def _udp_worker(self) -> None:
        sock = self._udp
        while not self._stopping.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return  # socket closed at shutdown
            try:
                resp = self.handle(data, peer[0], tcp=False)
                if resp is not None:
                    sock.sendto(resp, peer)
            except Exception:  # one bad exchange must not take a worker away
                log.exception("handling a UDP query from %s", peer[0])

    def shutdown(self) -> None:
        self._stopping.set()
        for t in self._threads:
            if t.name.startswith("dnsproxy-udp"):
                t.join(2)
        if self._udp is not None:
            self._udp.close()
        for s in self._servers:
            s.shutdown()
            s.server_close()
        if self._flow_log is not None:
            self._flow_log.close()


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

