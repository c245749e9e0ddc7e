"""The UDP event loop under concurrency, end to end: `flowtel dnsproxy` (no ``--upstream``) with
the real redirect and datapath, network-namespace pods.

Pods: "dns" (dnsmasq answering ``n0.par.test`` … ``n39.par.test``, each with its own address),
"silent" (a UDP socket on :53 that reads queries and never answers), three policed clients
(one asking over IPv6). Each client keeps 16 queries in flight over 4 sockets, with random IDs
and names, and the moment an answer arrives sends one datagram to its address.

Truth: each answer's ID, question and address against what that socket asked (a crossed ID
shows as a wrong name or address); the datapath's pinned counters (a datagram sent before its
address was in the allow map would be counted ``dropped``, not ``allowed_fqdn``); the proxy's
status counters and flow log; the allow map. Throughput is measured by bench/dnsproxy.py.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from testbed import Testbed
from tests.integration.test_fqdn_policy_e2e import Proxy, datapath_view  # noqa: F401 (fixture)

pytestmark = pytest.mark.kernel

NAMES = 40
PER_CLIENT = 400
# The proxy's --upstream-timeout. A query held up behind the silent resolver's would wait for
# (most of) it; on a loaded 2-CPU machine a query can also wait ~1 s for CPU alone (measured at
# load 9: max 1.0 s with nothing held up), so the timeout is long enough to tell the two apart.
TIMEOUT_S = 4.0

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: par, namespace: default}
spec:
  endpointSelector: {matchLabels: {role: client}}
  egress:
  - toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*.par.test"}]}}]
  - toFQDNs: [{matchPattern: "*.par.test"}]
"""

# Runs in a client pod: argv = resolver, silent resolver ("" for none), count, expected
# {name: address} as JSON. Prints one JSON line with what it saw.
_LOAD = r"""
import json, random, select, socket, struct, sys, time
import dns.message, dns.rcode
server, silent, count, expected = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
fam = socket.AF_INET6 if ":" in server else socket.AF_INET
names = sorted(expected)
out = {"answered": 0, "wrong": [], "lost": 0, "max_latency_s": 0.0, "sent_to_answers": 0}
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one datagram to each answer's address
t_start = time.monotonic()
slow = None
if silent:
    slow = socket.socket(fam, socket.SOCK_DGRAM); slow.connect((silent, 53))
    slow.send(dns.message.make_query("n0.par.test", "A").to_wire())
socks = []
for _ in range(4):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.connect((server, 53)); s.setblocking(False); socks.append(s)
pending = {s: {} for s in socks}  # socket -> {id: (name, sent at)}
sent = 0
def send(s):
    global sent
    name = random.choice(names)
    while True:
        qid = random.randrange(65536)
        if qid not in pending[s]:
            break
    q = dns.message.make_query(name, "A"); q.id = qid
    s.send(q.to_wire()); pending[s][qid] = (name, time.monotonic()); sent += 1
for s in socks:
    for _ in range(4):
        send(s)
def silent_answer():
    msg = dns.message.from_wire(slow.recv(4096))
    out["silent_rcode"] = dns.rcode.to_text(msg.rcode())
    out["silent_s"] = time.monotonic() - t_start
    out["answered_before_silent"] = out["answered"]
while out["answered"] < count:
    watch = socks + ([slow] if slow is not None and "silent_s" not in out else [])
    ready, _, _ = select.select(watch, [], [], 5)
    if not ready:
        out["lost"] = sum(len(p) for p in pending.values())
        break
    for s in ready:
        if s is slow:
            silent_answer()
            continue
        wire = s.recv(4096)
        msg = dns.message.from_wire(wire)
        asked = pending[s].pop(msg.id, None)
        if asked is None:
            out["wrong"].append(f"unexpected id {msg.id}")
            continue
        name, t0 = asked
        out["max_latency_s"] = max(out["max_latency_s"], time.monotonic() - t0)
        addrs = [r.address for rr in msg.answer for r in rr]
        got = msg.question[0].name.to_text().rstrip(".") if msg.question else ""
        if got != name or addrs != [expected[name]] or msg.rcode() != dns.rcode.NOERROR:
            out["wrong"].append(f"asked {name} id {msg.id}: got {got} {addrs} rcode {msg.rcode()}")
        for a in addrs:
            probe.sendto(b"x", (a, 9))  # at once: the allow map must already have it
            out["sent_to_answers"] += 1
        out["answered"] += 1
        if sent < count:
            send(s)
out["load_s"] = time.monotonic() - t_start
if slow is not None and "silent_s" not in out:
    slow.settimeout(TIMEOUT + 3)
    silent_answer()
print(json.dumps(out))
""".replace("TIMEOUT", repr(TIMEOUT_S))

_SILENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    s.recv(4096)  # read, never answer
"""


class Bed:
    def __init__(self, tb: Testbed, tmp: Path) -> None:
        self.tb = tb
        self.dns = tb.add_pod("dns", ipv6=True)
        self.silent = tb.add_pod("silent")
        self.clients = [tb.add_pod(f"client{i}", ipv6=True) for i in range(3)]
        # Answer addresses: in the testbed's own /24, above every pod, so the datagrams sent to
        # them stay on this machine (the /24's guard route answers them unreachable).
        net = tb.ipv4_network
        self.answers = {f"n{i}.par.test": str(net.network_address + 200 + i) for i in range(NAMES)}
        assert all(ipaddress.ip_address(a) in net for a in self.answers.values())
        tb.start_dnsmasq(self.dns, hosts={n: [a] for n, a in self.answers.items()})
        self.silent_proc = self.silent.popen([sys.executable, "-c", _SILENT, self.silent.ipv4],
                                             stdout=subprocess.PIPE, text=True)
        assert self.silent_proc.stdout is not None and self.silent_proc.stdout.readline().strip() == "ready"
        self.policies = tmp / "policies"
        self.policies.mkdir()
        (self.policies / "par.yaml").write_text(POLICY)
        self.pods_file = tmp / "pods.yaml"
        self.pods_file.write_text(yaml.safe_dump({"pods": [
            {"name": p.name, "namespace": "default", "ips": [ip for ip in (p.ipv4, p.ipv6) if ip],
             "labels": {"role": "client" if p.name.startswith("client") else p.name}}
            for p in (self.dns, self.silent, *self.clients)]}))


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    Testbed.cleanup_stale()
    with Testbed() as tb:
        yield Bed(tb, tmp_path_factory.mktemp("udploop"))


def _status(proxy: Proxy) -> dict[str, Any]:
    lines = [line for line in proxy.log.read_text().splitlines() if " status: " in line]
    return json.loads(lines[-1].split(" status: ", 1)[1]) if lines else {}


def test_parallel_queries_from_several_pods_get_their_own_answers_learned_first(
        bed: Bed, tmp_path: Path, datapath_view: Any) -> None:
    p = Proxy(bed, tmp_path, upstream=None, extra=("--upstream-timeout", str(TIMEOUT_S)))  # type: ignore[arg-type]
    try:
        view = datapath_view(p)
        before = view.counters()
        expected = json.dumps(bed.answers)
        # client0 also asks the silent resolver first: its query must not hold up the others.
        procs = [c.popen([sys.executable, "-c", _LOAD, bed.dns.ipv6 if i == 2 else bed.dns.ipv4,  # type: ignore[list-item]
                          bed.silent.ipv4 if i == 0 else "", str(PER_CLIENT), expected],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i, c in enumerate(bed.clients)]
        results = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        for r in results:
            assert r["wrong"] == [] and r["lost"] == 0, r
            assert r["answered"] == PER_CLIENT == r["sent_to_answers"]
            # Never stuck behind the upstream that does not answer (nor anything else).
            assert r["max_latency_s"] < TIMEOUT_S / 2, r
        silent = results[0]
        assert silent["silent_rcode"] == "SERVFAIL"
        assert silent["silent_s"] >= TIMEOUT_S * 0.9, silent
        # While the silent resolver's query was pending, this client's other queries went on:
        # all of them answered before its SERVFAIL came, or (a loaded machine, a slower load)
        # many windows of 16 in flight; a proxy held up behind it would have answered none.
        assert (silent["load_s"] < silent["silent_s"]
                or silent["answered_before_silent"] >= 4 * 16), silent

        # Every datagram to an answer's address passed as an FQDN allowance: none was sent
        # before the proxy had written its address into the allow map.
        after = view.counters()
        assert after["dropped"] - before["dropped"] == 0
        assert after["allowed_fqdn"] - before["allowed_fqdn"] == 3 * PER_CLIENT
        learned = view.allowed_entries()
        for c in bed.clients:
            for ip in bed.answers.values():
                assert (c.ipv4, ip) in learned and (c.ipv6, ip) in learned

        # Counted exactly: every answer, the one upstream timeout; one flow per answer.
        deadline = time.monotonic() + 5
        while _status(p).get("queries_allowed") != 3 * PER_CLIENT or _status(p).get("upstream_errors") != 1:
            assert time.monotonic() < deadline, _status(p)
            time.sleep(0.2)
        flows = [f for f in p.flows() if f.get("l7", {}).get("dns", {}).get("query", "").endswith(".par.test.")]
        by_client = {c.name: 0 for c in bed.clients}
        for f in flows:
            if f["verdict"] == "FORWARDED":
                by_client[f["destination"]["pod_name"]] += 1
        assert by_client == {c.name: PER_CLIENT for c in bed.clients}
    finally:
        p.close()
