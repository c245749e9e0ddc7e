"""DNS observation end to end on the real kernel: pods, real DNS servers, known queries.

The agent runs in-process (flowtel.pipeline.Service with the real ebpf receiver and file
exporter) so that a test-only exporter can read the metric points as well as the Hubble JSON
flow log. Truth: what the client pod sent and saw (ids, ports, rcodes, answers, its own
latency), dnsmasq's query log, and for the fuzz test the count of packets sent.

Once per message: every packet between two pods crosses two host-side veths, the sender's
(tc ingress) and the receiver's (tc egress), and flowtel counts a DNS message at the first,
as Retina (one receive in the host) and Hubble (one flow from the client's proxy) do. So each
query is one REQUEST flow at the client's veth, each answer one RESPONSE flow at the server's,
each unanswered query one unanswered flow, each malformed packet one parse error; a server
behind an interface flowtel does not observe has its answers counted at the client's veth.
"""
from __future__ import annotations

from tests.support.flowlog import read_flow_log

import ipaddress
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.histogram import bucket_index
from flowtel.records import MetricKind, MetricPoint
from testbed import Pod, Testbed
from receiver.ebpf import dnsmaps
from tests import dnsfuzz
from tests.support.memory_exporter import MemoryExporter, factories_with_memory

pytestmark = pytest.mark.kernel

DNS_TIMEOUT_S = 1.0
CLIENT_WAIT_S = 0.3  # how long the client waits before it gives a query up as unanswered
# The client's latency up to the kernel's receive timestamp exceeds flowtel's (on the client's
# veth) by the veth crossings and the send system call: far less than this.
LATENCY_SLACK_NS = 3_000_000


class InProcessAgent:
    """The ebpf receiver → file exporter (logs) and memory exporter (metrics)."""

    def __init__(self, tmp: Path, glob: str | list[str], dns: dict[str, Any]) -> None:
        self.flow_log = tmp / "flows.log"
        factories = factories_with_memory()
        cfg = parse_config(
            {
                "receivers": {"ebpf": {"interfaces": [glob] if isinstance(glob, str) else glob,
                                        "collection_interval": "500ms", "dns": dns,
                                        # Drops and TCP events are other tests' business here.
                                        "kernel_events": {"drops": {"enabled": False}, "tcp": {"enabled": False}}}},
                "exporters": {"file": {"path": str(self.flow_log), "max_size_mb": 100}, "memory": {}},
                "service": {"pipelines": {
                    "logs": {"receivers": ["ebpf"], "exporters": ["file"]},
                    "metrics": {"receivers": ["ebpf"], "exporters": ["memory"]},
                }},
            },
            "test_dns_e2e",
            factories=factories,
            environ={},
        )
        self.service = Service(cfg, node_name="test-node", factories=factories)
        self.service.start()
        self.receiver = self.service.receivers["ebpf"]
        self.metrics: MemoryExporter = self.service.exporters["memory"]  # type: ignore[assignment]
        self._stopped = False

    def wait_attached(self, pods: list[Pod], timeout: float = 30) -> None:
        want = {p.host_ifindex for p in pods}
        deadline = time.monotonic() + timeout
        while not want <= set(self.receiver.attach_manager.attached()):
            assert time.monotonic() < deadline, "tc programs were not attached to the pods' veths"
            time.sleep(0.05)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.service.shutdown()

    def flows(self) -> list[dict[str, Any]]:
        return [env["flow"] for env in read_flow_log(self.flow_log) if "flow" in env]

    def lost(self) -> list[dict[str, Any]]:
        return [env["lost_events"] for env in read_flow_log(self.flow_log)
                if "lost_events" in env]


@pytest.fixture
def agents():
    started: list[InProcessAgent] = []
    yield started
    for agent in started:
        agent.stop()


def l7_flows(flows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in flows if f.get("Type") == "L7"]


def client_of(flow: dict[str, Any]) -> tuple[str, str, int]:
    """(protocol, client address, client port) of a DNS flow, whichever way it goes."""
    (proto, ports), = flow["l4"].items()
    if flow.get("is_reply"):
        return proto, flow["IP"]["destination"], ports["destination_port"]
    return proto, flow["IP"]["source"], ports["source_port"]


def unanswered(flow: dict[str, Any]) -> bool:
    """An unanswered query's flow: marked in extensions and, for a consumer that ignores them,
    verdict ERROR with neither an l7.type nor is_reply (never a second REQUEST)."""
    marked = bool(flow.get("extensions", {}).get("dns_unanswered"))
    shaped = flow["verdict"] == "ERROR" and "type" not in flow["l7"] and "is_reply" not in flow
    assert marked == shaped, flow
    return marked


def l7_type(flow: dict[str, Any]) -> str:
    return flow["l7"].get("type", "UNKNOWN_L7_TYPE")  # protojson omits the enum's zero


# A DNS server answering by the first label of the name, over UDP and TCP: refused.* →
# REFUSED, servfail.* → SERVFAIL, formerr.* → FORMERR, drop.* → never answers.
RCODE_SERVER = r"""
import socket, struct, sys, threading
import dns.message, dns.rcode
RCODES = {"refused": dns.rcode.REFUSED, "servfail": dns.rcode.SERVFAIL, "formerr": dns.rcode.FORMERR}
def reply(wire):
    q = dns.message.from_wire(wire)
    label = q.question[0].name.labels[0].decode()
    if label == "drop":
        return None
    r = dns.message.make_response(q)
    r.set_rcode(RCODES[label])
    return r.to_wire()
def serve_udp(sock):
    while True:
        data, peer = sock.recvfrom(65535)
        out = reply(data)
        if out is not None:
            sock.sendto(out, peer)
def serve_conn(conn):
    with conn:
        while True:
            head = conn.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            out = reply(conn.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL))
            if out is not None:
                conn.sendall(struct.pack("!H", len(out)) + out)
def serve_tcp(sock):
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve_conn, args=(conn,), daemon=True).start()
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
for s in (udp, tcp):
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", 53))
tcp.listen(64)
threading.Thread(target=serve_tcp, args=(tcp,), daemon=True).start()
print("listening", flush=True)
serve_udp(udp)
"""

# Sends each query of a JSON list, one at a time, and reports what it saw: its own port,
# the DNS id, the rcode and answers, and two latencies: the one it measured around the
# exchange, and the kernel's receive timestamp of the answer (SO_TIMESTAMPNS) minus the
# time just before sending, which leaves out how long the client took to be scheduled.
CLIENT = r"""
import json, socket, struct, sys, time
import dns.message, dns.rdatatype
SO_TIMESTAMPNS = 35  # Linux; not exported by Python's socket module
queries = json.load(open(sys.argv[1]))
out = []
# The kernel switches receive timestamps on through a deferred work item when the first
# socket asks (net_enable_timestamp): a socket held open from here and a short wait make
# sure the answers below are stamped.
holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
holder.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
time.sleep(0.2)
def recv_exactly(s, n):
    buf, rx = b"", None
    while len(buf) < n:
        data, anc, _, _ = s.recvmsg(n - len(buf), 64)
        if not data:
            raise EOFError
        buf += data
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", value[:16])
                rx = sec * 1_000_000_000 + nsec
    return buf, rx
for q in queries:
    fam = socket.AF_INET6 if ":" in q["server"] else socket.AF_INET
    msg = dns.message.make_query(q["name"], q["qtype"])
    wire = msg.to_wire()
    resp = rx = None
    if q["proto"] == "UDP":
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", 0))
    else:
        s = socket.create_connection((q["server"], 53), timeout=5)
        wire = struct.pack("!H", len(wire)) + wire
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.settimeout(q["wait"])
    t0_wall = time.time_ns()
    t0 = time.perf_counter_ns()
    try:
        if q["proto"] == "UDP":
            s.sendto(wire, (q["server"], 53))
            while resp is None:
                data, anc, _, _ = s.recvmsg(65535, 64)
                t1 = time.perf_counter_ns()
                for level, kind, value in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", value[:16])
                        rx = sec * 1_000_000_000 + nsec
                m = dns.message.from_wire(data)
                if m.id == msg.id:
                    resp = m
        else:
            s.sendall(wire)
            head, rx = recv_exactly(s, 2)
            data, _ = recv_exactly(s, struct.unpack("!H", head)[0])
            t1 = time.perf_counter_ns()
            resp = dns.message.from_wire(data)
    except (socket.timeout, EOFError):
        pass
    sport = s.getsockname()[1]
    s.close()
    rec = dict(q, id=msg.id, sport=sport, rcode=None, ips=[], cnames=[], latency_ns=None, rx_latency_ns=None)
    if resp is not None:
        rec.update(rcode=resp.rcode(), latency_ns=t1 - t0, rx_latency_ns=rx - t0_wall)
        for rrset in resp.answer:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                rec["ips"] += [rd.address for rd in rrset]
            elif rrset.rdtype == dns.rdatatype.CNAME:
                rec["cnames"] += [rd.target.to_text() for rd in rrset]
    out.append(rec)
print(json.dumps(out))
"""


def start_rcode_server(bed: Testbed, pod: Pod, tmp: Path) -> None:
    out = tmp / f"rcode-{pod.name}.out"
    with out.open("w") as f:
        proc = pod.popen([sys.executable, "-c", RCODE_SERVER], stdout=f, stderr=f)
    deadline = time.monotonic() + 10
    while "listening" not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.02)


def run_client(pod: Pod, queries: list[dict[str, Any]], tmp: Path) -> list[dict[str, Any]]:
    spec = tmp / "queries.json"
    spec.write_text(json.dumps(queries))
    res = pod.exec([sys.executable, "-c", CLIENT, str(spec)], timeout=120)
    return json.loads(res.stdout)


def test_dns_counts_rcodes_and_latencies_equal_the_truth(bed: Testbed, tmp_path: Path, agents: list) -> None:
    client = bed.add_pod("client", ipv6=True)
    dnsmasq_pod = bed.add_pod("dnsmasq", ipv6=True)
    rcode_pod = bed.add_pod("rcodes", ipv6=True)
    silent = bed.add_pod("silent", ipv6=True)  # no DNS server: its kernel answers ICMP port unreachable
    # A DNS server behind a veth the agent does not observe (as the host or another node's pod
    # would be): its answers are counted where they reach the client.
    outside = bed.add_pod("outside", ipv6=True)
    query_log = tmp_path / "dnsmasq-queries.log"
    many = [f"198.51.100.{i}" for i in range(100, 150)]  # an answer longer than the 512-byte capture
    bed.start_dnsmasq(dnsmasq_pod, hosts={"web.test": ["198.51.100.10", "2001:db8::10"], "many.test": many},
                      log_path=str(query_log), extra_args=["--cname=alias.test,web.test"])
    start_rcode_server(bed, rcode_pod, tmp_path)
    bed.start_dnsmasq(outside, hosts={"web.test": ["198.51.100.10", "2001:db8::10"]})

    observed = [client, dnsmasq_pod, rcode_pod, silent]
    agent = InProcessAgent(tmp_path, [p.host_ifname for p in observed], {"timeout": f"{DNS_TIMEOUT_S}s"})
    agents.append(agent)
    agent.wait_attached(observed)

    queries = []
    for fam in (4, 6):
        addr = lambda p: p.ipv4 if fam == 4 else p.ipv6  # noqa: E731
        for proto in ("UDP", "TCP"):
            for name, qtype in (("web.test", "A"), ("web.test", "AAAA"), ("alias.test", "A"), ("nx.test", "A")):
                queries.append({"server": addr(dnsmasq_pod), "proto": proto, "name": name, "qtype": qtype})
            for name in ("refused.test", "servfail.test", "formerr.test", "drop.test"):
                queries.append({"server": addr(rcode_pod), "proto": proto, "name": name, "qtype": "A"})
        queries.append({"server": addr(silent), "proto": "UDP", "name": "nobody.test", "qtype": "A"})
    queries.append({"server": dnsmasq_pod.ipv4, "proto": "TCP", "name": "many.test", "qtype": "A"})
    for proto in ("UDP", "TCP"):
        queries.append({"server": outside.ipv4, "proto": proto, "name": "web.test", "qtype": "A"})
    for q in queries:
        q["wait"] = CLIENT_WAIT_S
    sent = run_client(client, queries, tmp_path)
    # The truth the test relies on is what it set up: every server answered but drop.* and silent.
    assert [q["rcode"] is None for q in sent] == [q["name"] in ("drop.test", "nobody.test") for q in sent]
    assert Counter(q["rcode"] for q in sent) == {0: 15, 3: 4, 5: 4, 2: 4, 1: 4, None: 6}
    assert sorted(next(q for q in sent if q["name"] == "many.test")["ips"]) == sorted(many)

    # dnsmasq logs asynchronously: wait for its line of every query sent to it.
    to_dnsmasq = [q for q in sent if q["server"] in (dnsmasq_pod.ipv4, dnsmasq_pod.ipv6)]
    deadline = time.monotonic() + 5
    while len(logged := re.findall(r"query\[(\w+)\] (\S+) from (\S+)", query_log.read_text())) < len(to_dnsmasq):
        assert time.monotonic() < deadline, query_log.read_text()
        time.sleep(0.05)
    time.sleep(DNS_TIMEOUT_S + 0.8)  # let the last unanswered queries time out in the agent
    agent.stop()

    flows = l7_flows(agent.flows())
    assert agent.lost() == []
    iface_of = {p.host_ifname: p for p in observed}
    by_query: dict[tuple, list[dict[str, Any]]] = {}
    for f in flows:
        proto, ip, port = client_of(f)
        key = (proto, ip, port, f["l7"]["dns"]["query"], tuple(f["l7"]["dns"]["qtypes"]))
        by_query.setdefault(key, []).append(f)
    assert len(by_query) == len(sent), "flows for queries that were not sent"

    for q in sent:
        ip = client.ipv4 if "." in q["server"] else client.ipv6
        got = by_query.get((q["proto"], ip, q["sport"], q["name"] + ".", (q["qtype"],)), [])
        server_pod = next(p for p in (dnsmasq_pod, rcode_pod, silent, outside) if q["server"] in (p.ipv4, p.ipv6))
        kinds = Counter((f["interface"]["name"], l7_type(f), unanswered(f)) for f in got)
        if q["rcode"] is None:
            assert kinds == {(client.host_ifname, "REQUEST", False): 1,
                             (client.host_ifname, "UNKNOWN_L7_TYPE", True): 1}, q
            continue
        # The response at the first pod interface it crosses: the server's, or (a server flowtel
        # does not observe) the client's.
        answered_at = client if server_pod is outside else server_pod
        assert kinds == {(client.host_ifname, "REQUEST", False): 1,
                         (answered_at.host_ifname, "RESPONSE", False): 1}, q
        seen = {l7_type(f): f for f in got}
        # The client pod's direction wherever the message was counted (Retina's, by QR): the
        # query is its egress, the answer its ingress.
        assert seen["REQUEST"]["traffic_direction"] == "EGRESS"
        resp = seen["RESPONSE"]
        assert resp["traffic_direction"] == "INGRESS" and resp["is_reply"] is True, resp
        dns_info = resp["l7"]["dns"]
        assert dns_info.get("rcode", 0) == q["rcode"], q
        if q["name"] == "many.test":  # the capture ends inside the answers: the whole ones count
            assert 20 < len(dns_info["ips"]) < len(many) and set(dns_info["ips"]) < set(many)
        else:
            assert sorted(dns_info.get("ips", [])) == sorted(q["ips"]), q
            assert dns_info.get("cnames", []) == q["cnames"], q
            if q["ips"]:
                assert dns_info["ttl"] == 60
        # The request counted at the client's veth, the response where it was counted: within
        # the exchange the client measured, and at most the veth crossings short of it.
        flow_ns = int(resp["l7"]["latency_ns"])
        assert 0 < flow_ns <= q["latency_ns"], q
        assert flow_ns <= q["rx_latency_ns"] < flow_ns + LATENCY_SLACK_NS, (q, flow_ns)
        assert all(iface_of[f["interface"]["name"]] in (client, server_pod) for f in got)

    # dnsmasq's own log: the queries it received are the REQUEST flows to its address (each
    # counted once, at the client's veth).
    at_dnsmasq = Counter((f["l7"]["dns"]["qtypes"][0], f["l7"]["dns"]["query"].rstrip("."))
                         for f in flows if f["IP"]["destination"] in (dnsmasq_pod.ipv4, str(dnsmasq_pod.ipv6))
                         and l7_type(f) == "REQUEST" and not unanswered(f))
    assert at_dnsmasq == Counter((t, n) for t, n, _ in logged)

    answered = [q for q in sent if q["rcode"] is not None]
    responses_by_rcode = Counter(f["l7"]["dns"].get("rcode", 0) for f in flows if l7_type(f) == "RESPONSE")
    assert responses_by_rcode == Counter(q["rcode"] for q in answered)
    dns_metrics = {k: v for k, v in agent.metrics.last_values().items()
                   if not k.startswith("networkobservability_forward_")  # node counters: not this test's
                   and k != "flowtel_dns_latency_seconds"}
    assert dns_metrics == {
        "networkobservability_dns_request_count": len(sent),
        "networkobservability_dns_response_count": len(answered),
        "flowtel_dns_unanswered_total": len(sent) - len(answered),
        "flowtel_dns_parse_errors_total": 0,
    }
    assert agent.receiver.dns.tracker.counts.truncated == 1  # many.test's answer
    # Every matched response's latency is in the histogram, in the bucket its flow's latency falls in.
    latency = agent.metrics.last_point("flowtel_dns_latency_seconds")
    measured = [int(f["l7"]["latency_ns"]) / 1e9 for f in flows
                if l7_type(f) == "RESPONSE" and "latency_ns" in f["l7"]]
    assert len(measured) == len(answered)
    assert latency.kind == MetricKind.HISTOGRAM and latency.attributes == {}
    assert latency.count == len(measured)
    assert latency.value == pytest.approx(sum(measured))
    expected = [0] * (len(latency.bounds) + 1)
    for seconds in measured:
        expected[bucket_index(latency.bounds, seconds)] += 1
    assert list(latency.bucket_counts) == expected


def test_malformed_dns_is_counted_exactly_and_valid_queries_still_reported(bed: Testbed, tmp_path: Path,
                                                                           agents: list) -> None:
    sender, target = bed.add_pod("fuzzer"), bed.add_pod("target")
    bed.start_tcp_sink(target, 53)  # a TCP peer, so that malformed DNS over TCP is carried too
    # Every message sampled: the kernel reads header and question, dnspython the rest, and
    # this test checks both verdicts one message at a time (test_dns_full_rate is the other regime).
    agent = InProcessAgent(tmp_path, bed.interface_glob, {"timeout": f"{DNS_TIMEOUT_S}s", "sample_rate": 1_000_000})
    agents.append(agent)
    agent.wait_attached([sender, target])

    rng = random.Random(20240917)
    udp_bad = dnsfuzz.malformed(rng, 3000)
    tcp_bad = dnsfuzz.tcp_malformed(rng, 40)
    plan = tmp_path / "plan.bin"
    valid_ids = []
    with plan.open("wb") as f:
        def put(kind: int, port: int, data: bytes) -> None:
            f.write(struct.pack("!BHH", kind, port, len(data)) + data)

        for i, m in enumerate(udp_bad):
            put(0, 53, m)
            if i % 100 == 0:  # a valid query every 100 malformed ones
                q = dnsfuzz.valid_query(f"valid{i}.test")
                valid_ids.append((f"valid{i}.test.", q.id))
                put(0, 53, q.to_wire())
            if i % 60 == 0:  # DNS-shaped and garbage traffic to a port that is not configured
                put(0, 54, dnsfuzz.valid_query("other-port.test").to_wire())
                put(0, 54, m)
        for m in tcp_bad:
            put(1, 53, m)
    res = sender.exec([sys.executable, "-c", FUZZ_SENDER, target.ipv4, str(plan)], timeout=120)
    assert json.loads(res.stdout) == {"udp": len(udp_bad) + len(valid_ids) + 2 * 50, "tcp": len(tcp_bad)}

    expected_errors = len(udp_bad) + len(tcp_bad)  # at the sender's veth; the target's skips them
    dns_ring = agent.receiver.dns
    deadline = time.monotonic() + 10
    while dns_ring.tracker.counts.parse_errors < expected_errors and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dns_ring.alive  # the agent is still up and reading
    kernel = dns_ring.kernel_counts()
    written = kernel["SAMPLES"]
    lost = kernel["SAMPLES_LOST"]
    assert lost == 0, f"the ring buffer overflowed ({lost} lost): the test's pacing is too fast for this machine"
    assert kernel["SAMPLES_SKIPPED"] == 0
    time.sleep(0.6)  # one more metrics interval
    agent.stop()
    assert agent.receiver.dns.tracker.counts.events == written  # every record written was read

    counts = agent.receiver.dns.tracker.counts
    assert counts.parse_errors == expected_errors
    assert agent.metrics.last_values()["flowtel_dns_parse_errors_total"] == expected_errors
    assert agent.service.telemetry.get("ebpf", "dns_errors") == 0  # the reader never failed

    flows = l7_flows(agent.flows())
    assert all(client_of(f)[0] == "UDP" and f["l4"]["UDP"].get("destination_port") == 53 for f in flows)
    requests = Counter((f["l7"]["dns"]["query"], f["interface"]["name"]) for f in flows
                       if l7_type(f) == "REQUEST" and not unanswered(f))
    assert requests == {(name, sender.host_ifname): 1 for name, _ in valid_ids}
    assert counts.requests == len(valid_ids)


# Sends a plan of (kind, port, payload) records: kind 0 a UDP datagram, kind 1 one TCP
# connection carrying the payload in one segment. UDP is paced so that the veth backlog
# (netdev_max_backlog) never drops a datagram before tc sees it.
FUZZ_SENDER = r"""
import json, socket, struct, sys, time
dst, path = sys.argv[1], sys.argv[2]
data = open(path, "rb").read()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = {"udp": 0, "tcp": 0}
pos = 0
while pos < len(data):
    kind, port, n = struct.unpack_from("!BHH", data, pos)
    payload = data[pos + 5 : pos + 5 + n]
    pos += 5 + n
    if kind == 0:
        udp.sendto(payload, (dst, port))
        sent["udp"] += 1
        time.sleep(0.0002)
    else:
        c = socket.create_connection((dst, port), timeout=10)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        while c.recv(4096):
            pass
        c.close()
        sent["tcp"] += 1
print(json.dumps(sent))
"""


def _dnsperf(pod: Pod, server: str, queries: Path, *, seconds: float, extra: list[str]) -> dict[str, Any]:
    """Run dnsperf in ``pod`` and return its own statistics: sent, completed, lost, rcodes."""
    res = pod.exec(["dnsperf", "-s", server, "-d", str(queries), "-l", str(seconds), *extra],
                   timeout=seconds + 60)
    out = res.stdout

    def number(label: str) -> int:
        m = re.search(rf"^\s*{label}:\s+(\d+)", out, re.M)
        assert m is not None, out
        return int(m.group(1))

    rcodes: dict[str, int] = {}
    m = re.search(r"^\s*Response codes:\s+(.*)$", out, re.M)
    if m is not None:
        rcodes = {name: int(n) for name, n in re.findall(r"([A-Z]+) (\d+) \(", m.group(1))}
    return {"sent": number("Queries sent"), "completed": number("Queries completed"),
            "lost": number("Queries lost"), "rcodes": rcodes, "output": out[out.find("Statistics:"):]}


class _HubbleAgent(InProcessAgent):
    """The ebpf receiver → file exporter and the hubblemetrics connector (dns family)."""

    def __init__(self, tmp: Path, glob: str, dns: dict[str, Any]) -> None:
        self.flow_log = tmp / "flows.log"
        factories = factories_with_memory()
        cfg = parse_config(
            {
                "receivers": {"ebpf": {"interfaces": [glob], "collection_interval": "500ms", "dns": dns,
                                        "kernel_events": {"drops": {"enabled": False}, "tcp": {"enabled": False}}}},
                "connectors": {"hubblemetrics": {"metrics": ["dns"]}},
                "exporters": {"file": {"path": str(self.flow_log), "max_size_mb": 500}, "memory": {}},
                "service": {"pipelines": {
                    "logs": {"receivers": ["ebpf"], "exporters": ["file", "hubblemetrics"]},
                    "metrics": {"receivers": ["ebpf", "hubblemetrics"], "exporters": ["memory"]},
                }},
            },
            "test_dns_e2e",
            factories=factories,
            environ={},
        )
        self.service = Service(cfg, node_name="test-node", factories=factories)
        self.service.start()
        self.receiver = self.service.receivers["ebpf"]
        self.metrics: MemoryExporter = self.service.exporters["memory"]  # type: ignore[assignment]
        self._stopped = False

    def hubble_sums(self, name: str, label: str) -> Counter:
        """The last value of each series of ``name``, summed by one label."""
        last: dict[tuple, MetricPoint] = {}
        with self.metrics._lock:
            for r in self.metrics.records:
                if isinstance(r, MetricPoint) and r.name == name:
                    last[tuple(sorted(r.attributes.items()))] = r
        out: Counter = Counter()
        for p in last.values():
            out[p.attributes[label]] += int(p.value)
        return out


def _fnv1a(name: str) -> int:
    """FNV-1a 64 over a name's wire form without the root label (bpf/dns.h's name hash)."""
    h = 0xCBF29CE484222325
    for label in name.lower().rstrip(".").split("."):
        for byte in bytes([len(label)]) + label.encode():
            h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _messages(flow: dict[str, Any]) -> int:
    ext = flow.get("extensions", {})
    return int(ext["count"]) if ext.get("aggregated") else 1


def test_dns_at_full_dnsperf_rate_counts_exactly_with_the_sample_ring_overflowing(
        bed: Testbed, tmp_path: Path, agents: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """dnsperf as fast as dnsmasq answers, and queries to a pod where nothing answers: every
    count equals dnsperf's own statistics and the veths' kernel counters, while the sample
    ring is far too small for the rate (its overflow is counted and costs no count)."""
    # Maps read in chunks much smaller than what they hold here (thousands of keys and
    # pending queries), so that reading across chunks is part of what is checked.
    monkeypatch.setattr(dnsmaps, "CHUNK_ENTRIES", 128)
    client = bed.add_pod("perf")
    server = bed.add_pod("dnsmasq")
    silent = bed.add_pod("silent")
    bed.start_dnsmasq(server, hosts={"web.test": ["198.51.100.10"]})
    bed.start_udp_sink(silent, 53)  # reads every query, answers none
    agent = _HubbleAgent(tmp_path, bed.interface_glob,
                         {"timeout": f"{DNS_TIMEOUT_S}s", "sample_rate": 1_000_000, "ring_buffer_kb": 64})
    agents.append(agent)
    agent.wait_attached([client, server, silent])

    queries = tmp_path / "queries.txt"
    # NOERROR with an answer, NOERROR without one (NODATA), NXDOMAIN, and many names.
    queries.write_text("".join(f"web.test A\nweb.test AAAA\nnx{i}.test A\n" for i in range(200)))
    before = {p.name: bed.link_stats(p) for p in (client, server, silent)}
    # -t 5: every answer dnsmasq sends arrives well inside dnsperf's timeout.
    perf = _dnsperf(client, server.ipv4, queries, seconds=3, extra=["-c", "4", "-q", "100", "-t", "5"])
    quiet = _dnsperf(client, silent.ipv4, queries, seconds=1, extra=["-Q", "2000", "-q", "2000", "-t", "1"])
    time.sleep(DNS_TIMEOUT_S + 1.5)  # the agent's sweep reports the last unanswered queries
    after = {p.name: bed.link_stats(p) for p in (client, server, silent)}
    dns_ring = agent.receiver.dns
    kernel = dns_ring.kernel_counts()
    agent.stop()

    sent = perf["sent"] + quiet["sent"]
    answered = perf["completed"]
    # Queries dnsmasq had no time for (its socket overflowed) are unanswered too.
    no_answer = quiet["sent"] + perf["lost"]
    assert quiet["completed"] == 0 and perf["sent"] == answered + perf["lost"], perf["output"]
    assert answered > 20_000, f"dnsperf did only {answered} queries: {perf['output']}"
    # The kernel's own counters of the veths (rx: sent by the pod): nothing else crossed them.
    delta = {name: after[name] - before[name] for name in after}
    assert delta["perf"].rx_packets == sent and delta["perf"].tx_packets == answered
    assert delta["dnsmasq"].tx_packets == perf["sent"] and delta["dnsmasq"].rx_packets == answered
    assert delta["silent"].tx_packets == quiet["sent"] and delta["silent"].rx_packets == 0

    # The regime this test is about: samples lost to a full ring, and counts exact anyway.
    assert kernel["SAMPLES_LOST"] > 0, kernel
    assert kernel["PENDING_FULL"] == 0 and kernel["UNMATCHED"] == 0, kernel
    assert [lost for lost in agent.lost() if lost["source"] != "DNS_RING_BUFFER_FULL"] == []

    # Once per message: every packet the client's veth passed (either way) went on to, or came
    # from, another observed pod veth, where the kernel skipped it.
    assert kernel["SEEN_BEFORE"] == delta["perf"].rx_packets + delta["perf"].tx_packets, kernel
    values = agent.metrics.last_values()
    assert values["networkobservability_dns_request_count"] == sent
    assert values["networkobservability_dns_response_count"] == answered
    assert values["flowtel_dns_unanswered_total"] == no_answer
    assert values["flowtel_dns_parse_errors_total"] == 0
    latency = agent.metrics.last_point("flowtel_dns_latency_seconds")
    assert latency.count == answered == sum(latency.bucket_counts)

    rcode_words = {"NOERROR": "No Error", "NXDOMAIN": "Non-Existent Domain"}
    want_rcodes = Counter({rcode_words[k]: n for k, n in perf["rcodes"].items()})
    assert agent.hubble_sums("hubble_dns_responses_total", "rcode") == want_rcodes
    assert sum(agent.hubble_sums("hubble_dns_queries_total", "rcode").values()) == sent

    # The flows: every message in exactly one, sampled or aggregated (extensions.count).
    flows = l7_flows(agent.flows())
    requests = sum(_messages(f) for f in flows if l7_type(f) == "REQUEST" and not unanswered(f))
    lost_flows = sum(_messages(f) for f in flows if unanswered(f))
    by_rcode = Counter()
    for f in flows:
        if l7_type(f) == "RESPONSE":
            by_rcode[f["l7"]["dns"].get("rcode", 0)] += _messages(f)
    assert requests == sent and lost_flows == no_answer
    assert by_rcode == {{"NOERROR": 0, "NXDOMAIN": 3}[k]: n for k, n in perf["rcodes"].items()}
    aggregated = [f for f in flows if f.get("extensions", {}).get("aggregated")]
    # Named from a sample of the name, or (its samples all lost to the tiny ring so far) by the
    # kernel's hash of it, which is FNV-1a 64 of the lower-case wire name.
    hashes = {f"{_fnv1a(n):016x}": n + "." for n in {line.split()[0] for line in queries.read_text().splitlines()}}
    assert aggregated
    for f in aggregated:
        query = f["l7"]["dns"].get("query") or hashes.get(f["extensions"].get("query_hash", ""))
        assert query in hashes.values(), f


# Sends each query over its own TCP connection with its 2-byte length prefix and the first
# bytes of the message in one segment and the rest in a second one (TCP_NODELAY, a pause
# between), then reads the answer: a message whose question is not in the segment that starts it.
SPLIT_SENDER = r"""
import json, socket, struct, sys, time
import dns.message
server, count = sys.argv[1], int(sys.argv[2])
answered = 0
for i in range(count):
    wire = dns.message.make_query(f"split{i}.test", "A").to_wire()
    c = socket.create_connection((server, 53), timeout=5)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(struct.pack("!H", len(wire)) + wire[:6])
    time.sleep(0.05)
    c.sendall(wire[6:])
    got = b""
    while len(got) < 2 or len(got) < 2 + struct.unpack("!H", got[:2])[0]:
        chunk = c.recv(4096)
        if not chunk:
            break
        got += chunk
    answered += len(got) > 2
    c.close()
print(json.dumps({"answered": answered}))
"""


def _settle(agent: InProcessAgent, query_log: Path, queries: int) -> tuple[dict[str, int], dict[str, float]]:
    """Once dnsmasq logged ``queries`` A queries and the DNS timeout has run out (so nothing may
    be reported unanswered any more): the kernel's DNS counters, then, with the agent stopped,
    its last metric values."""
    deadline = time.monotonic() + 5
    while len(re.findall(r"query\[A\]", query_log.read_text())) < queries:
        assert time.monotonic() < deadline, query_log.read_text()
        time.sleep(0.05)
    time.sleep(DNS_TIMEOUT_S + 1.0)
    kernel = agent.receiver.dns.kernel_counts()
    agent.stop()
    return kernel, agent.metrics.last_values()


def test_dns_over_tcp_is_counted_in_the_kernel_and_split_questions_are_reported_lost(
        bed: Testbed, tmp_path: Path, agents: list) -> None:
    """dig +tcp against dnsmasq: every query and answer counted in the kernel (requests,
    responses by rcode, latencies) as dig and dnsmasq's log say; queries whose question
    arrives in a second segment are not counted but reported (LostEvents DNS_TCP_UNPARSED,
    at the client's veth), their second segments are skipped rather than misread, and
    their answers (whole in one segment) are counted as responses."""
    client, server = bed.add_pod("tcpc"), bed.add_pod("tcpdns")
    query_log = tmp_path / "dnsmasq-queries.log"
    bed.start_dnsmasq(server, hosts={"web.test": ["198.51.100.10"]}, log_path=str(query_log))
    agent = InProcessAgent(tmp_path, bed.interface_glob, {"timeout": f"{DNS_TIMEOUT_S}s"})
    agents.append(agent)
    agent.wait_attached([client, server])

    names = [("web.test", "NOERROR"), ("nx.test", "NXDOMAIN")] * 10
    statuses = []
    for name, _ in names:
        res = client.exec(["dig", "+tcp", "+tries=1", "+time=3", f"@{server.ipv4}", name, "A"], timeout=30)
        statuses.append(re.search(r"status: (\w+)", res.stdout).group(1))  # type: ignore[union-attr]  # dig prints a status line for every answer
    assert statuses == [want for _, want in names]
    split = 5
    res = client.exec([sys.executable, "-c", SPLIT_SENDER, server.ipv4, str(split)], timeout=60)
    assert json.loads(res.stdout) == {"answered": split}
    kernel, values = _settle(agent, query_log, len(names) + split)
    assert values["networkobservability_dns_request_count"] == len(names)
    assert values["networkobservability_dns_response_count"] == len(names) + split
    assert values["flowtel_dns_unanswered_total"] == 0
    assert values["flowtel_dns_parse_errors_total"] == 0
    assert agent.metrics.last_point("flowtel_dns_latency_seconds").count == len(names)
    assert kernel["TCP_UNPARSED"] == split and kernel["TCP_CONTINUATIONS"] == split
    assert kernel["UNMATCHED"] == split  # the answers to queries it could not read
    # On the wire DNS_TCP_UNPARSED is Cilium's source for a loss in the kernel; nothing else was lost.
    lost = agent.lost()
    assert {le["source"] for le in lost} == {"PERF_EVENT_RING_BUFFER"}
    assert sum(int(le["num_events_lost"]) for le in lost) == split

    flows = l7_flows(agent.flows())
    assert {next(iter(f["l4"])) for f in flows} == {"TCP"}
    requests = Counter(f["l7"]["dns"]["query"] for f in flows if l7_type(f) == "REQUEST" for _ in range(_messages(f)))
    assert requests == {"web.test.": 10, "nx.test.": 10}
    rcodes = Counter(f["l7"]["dns"].get("rcode", 0) for f in flows if l7_type(f) == "RESPONSE"
                     for _ in range(_messages(f)))
    assert rcodes == {0: 10, 3: 10 + split}  # split*.test: NXDOMAIN too


def test_a_host_process_asking_a_pod_is_counted_once_where_it_reaches_the_pod(bed: Testbed, tmp_path: Path,
                                                                            agents: list) -> None:
    """A client that is no pod (dig in the host's own network namespace): its queries reach
    the server pod's veth without having crossed an observed interface (no ingress interface:
    the host sent them), so they are counted there, and the answers where the pod sends them;
    one request and one response each, timed and matched."""
    server = bed.add_pod("hostdns")
    query_log = tmp_path / "dnsmasq-queries.log"
    bed.start_dnsmasq(server, hosts={"web.test": ["198.51.100.10"]}, log_path=str(query_log))
    agent = InProcessAgent(tmp_path, bed.interface_glob, {"timeout": f"{DNS_TIMEOUT_S}s"})
    agents.append(agent)
    agent.wait_attached([server])
    statuses = []
    for name in ("web.test", "nx.test") * 3:
        res = subprocess.run(["dig", "+time=2", "+tries=1", f"@{server.ipv4}", name, "A"], capture_output=True,
                             text=True, timeout=30)
        m = re.search(r"status: (\w+)", res.stdout)
        statuses.append(m.group(1) if m else "")
    assert statuses == ["NOERROR", "NXDOMAIN"] * 3
    kernel, values = _settle(agent, query_log, len(statuses))
    assert values["networkobservability_dns_request_count"] == len(statuses)
    assert values["networkobservability_dns_response_count"] == len(statuses)
    assert values["flowtel_dns_unanswered_total"] == 0
    assert agent.metrics.last_point("flowtel_dns_latency_seconds").count == len(statuses)
    assert kernel["SEEN_BEFORE"] == 0 and kernel["UNMATCHED"] == 0, kernel
    flows = l7_flows(agent.flows())
    assert Counter((f["interface"]["name"], l7_type(f)) for f in flows) == {
        (server.host_ifname, "REQUEST"): len(statuses), (server.host_ifname, "RESPONSE"): len(statuses)}


@pytest.mark.parametrize("masquerade", [False, True], ids=["routed", "masqueraded"])
def test_an_uplink_counts_the_hosts_own_exchanges_and_leaves_a_pods_to_its_veth(
        bed: Testbed, tmp_path: Path, agents: list, masquerade: bool) -> None:
    """An observed interface that is not a pod's (a bridge standing for the node's uplink, a DNS
    server behind it): the host's own queries out of it are counted there, with their answers;
    a pod's query through it is counted at the pod's veth only (skipped where it leaves by the
    uplink), and its answer, which comes in by the uplink, at the pod's veth, where it reaches
    the pod. One request and one response per query, every exchange matched. Masqueraded (as
    a node sends pods' traffic out, CoreDNS's to its upstream): the answer arrives at the uplink
    addressed to the node, and still counts, matched, at the pod's veth, after the kernel has
    undone the NAT."""
    client = bed.add_pod("upc")
    tag = f"s8u{os.getpid() % 100000}"
    br, host_end, far_end, ns = f"{tag}br", f"{tag}h", f"{tag}n", f"{tag}ns"
    net = ipaddress.ip_network(f"100.127.{os.getpid() % 250}.0/29")
    gw, upstream = str(net[1]), str(net[2])

    def sh(*argv: str) -> None:
        subprocess.run(list(argv), check=True, capture_output=True)

    def teardown() -> None:
        for argv in (["ip", "netns", "del", ns], ["ip", "link", "del", br], ["ip", "link", "del", host_end],
                     ["nft", "delete", "table", "ip", tag]):
            subprocess.run(argv, capture_output=True)

    teardown()  # what a killed run left
    dnsmasq = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", br, "type", "bridge")
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", far_end)
        for ifname in (br, host_end):
            sh("sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1")
        sh("ip", "link", "set", far_end, "netns", ns)
        sh("ip", "link", "set", host_end, "master", br)
        sh("ip", "addr", "add", f"{gw}/{net.prefixlen}", "dev", br)
        for ifname in (br, host_end):
            sh("ip", "link", "set", ifname, "up")
        inside = ["ip", "netns", "exec", ns]
        sh(*inside, "sysctl", "-qw", f"net.ipv6.conf.{far_end}.disable_ipv6=1")
        sh(*inside, "ip", "addr", "add", f"{upstream}/{net.prefixlen}", "dev", far_end)
        sh(*inside, "ip", "link", "set", far_end, "up")
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "route", "add", "default", "via", gw)
        if masquerade:
            subprocess.run(["nft", "-f", "-"], check=True, capture_output=True, text=True, input=f"""table ip {tag} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat;
        oifname "{br}" ip saddr {client.ipv4} masquerade
    }}
}}
""")
        query_log = tmp_path / "upstream-queries.log"
        dnsmasq = subprocess.Popen(
            [*inside, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
             "--no-poll", "--local=/#/", "--bind-interfaces", "--port=53", f"--listen-address={upstream}",
             "--pid-file=", "--host-record=web.test,198.51.100.10", f"--log-facility={query_log}",
             "--log-queries"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def dig(pod: Pod | None) -> str:
            argv = ["dig", "+time=2", "+tries=1", f"@{upstream}", "web.test", "A"]
            out = pod.exec(argv, check=False).stdout if pod is not None else \
                subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
            m = re.search(r"status: (\w+)", out)
            return m.group(1) if m else ""

        deadline = time.monotonic() + 10
        while dig(None) != "NOERROR":  # dnsmasq is up (before the agent: not counted)
            assert time.monotonic() < deadline, "the upstream dnsmasq did not answer"
            time.sleep(0.1)
        agent = InProcessAgent(tmp_path, [br, client.host_ifname], {"timeout": f"{DNS_TIMEOUT_S}s"})
        agents.append(agent)
        deadline = time.monotonic() + 30
        while not {client.host_ifindex, socket.if_nametoindex(br)} <= set(agent.receiver.attach_manager.attached()):
            assert time.monotonic() < deadline, "tc programs were not attached"
            time.sleep(0.05)
        n = 3
        assert [dig(None) for _ in range(n)] == ["NOERROR"] * n  # the host's own
        assert [dig(client) for _ in range(n)] == ["NOERROR"] * n  # a pod's, routed by the host
        deadline = time.monotonic() + 5
        while len(re.findall(r"query\[A\] web\.test", query_log.read_text())) < 2 * n + 1:
            assert time.monotonic() < deadline, query_log.read_text()
            time.sleep(0.05)
        time.sleep(DNS_TIMEOUT_S + 1.0)  # past the timeout: nothing may be reported unanswered
        kernel = agent.receiver.dns.kernel_counts()
        agent.stop()
    finally:
        if dnsmasq is not None:
            dnsmasq.kill()
            dnsmasq.wait(10)
        teardown()

    values = agent.metrics.last_values()
    assert values["networkobservability_dns_request_count"] == 2 * n
    assert values["networkobservability_dns_response_count"] == 2 * n
    assert values["flowtel_dns_unanswered_total"] == 0
    assert agent.metrics.last_point("flowtel_dns_latency_seconds").count == 2 * n
    # The pod's queries leaving by the uplink, and its answers arriving there.
    assert kernel["SEEN_BEFORE"] == n and kernel["NOT_HERE"] == n and kernel["UNMATCHED"] == 0, kernel
    flows = l7_flows(agent.flows())
    assert Counter((f["interface"]["name"], l7_type(f), f["IP"]["source"] if l7_type(f) == "REQUEST"
                    else f["IP"]["destination"]) for f in flows) == {
        (br, "REQUEST", gw): n, (br, "RESPONSE", gw): n,
        (client.host_ifname, "REQUEST", client.ipv4): n, (client.host_ifname, "RESPONSE", client.ipv4): n}
    # The upstream saw the pod's queries from the pod, or (masqueraded) from the node.
    sources = Counter(re.findall(r"query\[A\] web\.test from (\S+)", query_log.read_text()))
    assert sources[gw] >= (2 * n if masquerade else n) + 1  # + the readiness probe
    assert sources[client.ipv4] == (0 if masquerade else n), sources


def test_a_query_to_a_service_address_is_one_exchange_though_its_answer_comes_from_the_pod(
        bed: Testbed, tmp_path: Path, agents: list) -> None:
    """A pod asks a Service's address (a DNAT in the host, as kube-proxy does for kube-dns):
    its query is counted at its veth, to the Service address; the answer at the DNS pod's veth,
    from the pod's own address (the NAT is undone after it). One exchange all the same: each
    query matched, timed, none unanswered."""
    client, server = bed.add_pod("svcc"), bed.add_pod("svcdns")
    bed.start_dnsmasq(server, hosts={"web.test": ["198.51.100.10"]})
    tag = f"s8s{os.getpid() % 100000}"
    service = f"100.126.{os.getpid() % 250}.10"
    nat = f"""table ip {tag} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat;
        ip daddr {service} udp dport 53 dnat to {server.ipv4}
        ip daddr {service} tcp dport 53 dnat to {server.ipv4}
    }}
}}
"""
    subprocess.run(["nft", "delete", "table", "ip", tag], capture_output=True)  # what a killed run left
    subprocess.run(["nft", "-f", "-"], check=True, capture_output=True, text=True, input=nat)
    try:
        agent = InProcessAgent(tmp_path, bed.interface_glob, {"timeout": f"{DNS_TIMEOUT_S}s"})
        agents.append(agent)
        agent.wait_attached([client, server])
        statuses = []
        for tcp in (False, True) * 3:
            res = client.exec(["dig", "+time=2", "+tries=1", *(["+tcp"] if tcp else []), f"@{service}", "web.test", "A"],
                              check=False)
            m = re.search(r"status: (\w+)", res.stdout)
            statuses.append(m.group(1) if m else "")
        assert statuses == ["NOERROR"] * 6
        time.sleep(DNS_TIMEOUT_S + 1.0)  # past the timeout: nothing may be reported unanswered
        kernel = agent.receiver.dns.kernel_counts()
        agent.stop()
    finally:
        subprocess.run(["nft", "delete", "table", "ip", tag], capture_output=True)

    values = agent.metrics.last_values()
    assert values["networkobservability_dns_request_count"] == 6
    assert values["networkobservability_dns_response_count"] == 6
    assert values["flowtel_dns_unanswered_total"] == 0
    assert agent.metrics.last_point("flowtel_dns_latency_seconds").count == 6
    assert kernel["UNMATCHED"] == 0, kernel
    flows = l7_flows(agent.flows())
    assert Counter((f["interface"]["name"], l7_type(f), f["IP"]["source"], f["IP"]["destination"]) for f in flows) == {
        (client.host_ifname, "REQUEST", client.ipv4, service): 6,
        (server.host_ifname, "RESPONSE", server.ipv4, client.ipv4): 6}
    assert all(int(f["l7"]["latency_ns"]) > 0 for f in flows if l7_type(f) == "RESPONSE")
