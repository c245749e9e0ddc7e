"""The DNS proxy against a hostile pod, end to end: `flowtel dnsproxy` as its own process,
the agent's pipeline in-process (fqdnpolicy → hubblemetrics → Prometheus), real kernel,
network-namespace pods, dnsmasq resolvers.

The attacker is the "client" pod; "bystander" has the same policy and must keep its DNS
within its normal latency whatever the client does. "rogue" runs a resolver of the client's
own choosing that answers the allowed name with the address of "other". "degraded" has a
policy with a field flowtel cannot evaluate (a named port).

Truth: the resolvers' own query logs (dnsmasq --log-queries), the pinned counters, the
drop flows and hubble_drop_total the agent derives from the kernel's fqdn_denied counters,
the TCP sink's byte counts, dig's answers and timings, and the proxy's own /metrics and
/healthz.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from flowtel.testbed import Pod, Testbed
from tests.integration.test_fqdn_drops_e2e import Agent, scrape, series
from tests.integration.test_fqdn_policy_e2e import Proxy, connect, dig
from tests.support.otlp_receiver import free_port

pytestmark = pytest.mark.kernel

WEB_PORT = 8080
# A tenant's pattern that backtracking engines take exponential time on, and a name that
# almost matches it (no final "b"): with Python's `re` one query held the GIL for minutes.
MANY_STARS = "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b.test"
LONG_NAME = ".".join(["a" * 60] * 4) + ".test"  # 248 characters

POLICIES = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: client-egress, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: dns}}}}]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{{matchName: allowed.example.test}}, {{matchName: api.short.test}}, {{matchPattern: "{MANY_STARS}"}}]
  - toFQDNs: [{{matchName: allowed.example.test}}, {{matchName: api.short.test}}]
    toPorts: [{{ports: [{{port: "{WEB_PORT}", protocol: TCP}}]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: degraded-egress, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: degraded}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: dns}}}}]
    toPorts: [{{ports: [{{port: "53", protocol: UDP}}]}}]
  # A named port: Cilium resolves it per destination pod's container ports, flowtel cannot.
  - toEndpoints: [{{matchLabels: {{app: web}}}}]
    toPorts: [{{ports: [{{port: "http-alt", protocol: TCP}}]}}]
"""

# Raw DNS from inside a pod (dnspython, the test's interpreter): what dig cannot send.
_RAW = r"""
import json, socket, sys, time
import dns.message, dns.name, dns.opcode, dns.rdataclass, dns.rdatatype, dns.rrset, dns.update
kind, server = sys.argv[1], sys.argv[2]
q = dns.message.make_query("allowed.example.test", "A")
if kind == "two-questions":
    q.question.append(dns.rrset.RRset(dns.name.from_text("denied.example.test"), dns.rdataclass.IN, dns.rdatatype.A))
    wire = q.to_wire()
elif kind == "update":
    u = dns.update.UpdateMessage("example.test"); u.add("denied", 60, "TXT", "exfiltrated"); wire = u.to_wire()
elif kind == "additional":
    q.additional.append(dns.rrset.from_text("denied.example.test.", 60, "IN", "TXT", "smuggled")); wire = q.to_wire()
elif kind == "response":
    wire = dns.message.make_response(q).to_wire()
elif kind == "long":
    wire = dns.message.make_query(sys.argv[4], "A").to_wire()
count = int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((server, 53))
s.settimeout(0.2 if kind == "response" else 2)  # a response is never answered: do not wait long
rcodes = []
for _ in range(count):
    s.send(wire)
    try:
        rcodes.append(dns.message.from_wire(s.recv(65535)).rcode())
    except (TimeoutError, OSError):
        rcodes.append(None)
print(json.dumps(rcodes))
"""

# Slow-drip TCP clients: open N connections to server:53 and send one byte of a query
# every second; report how each ended (closed by the server, or still open).
_DRIP = r"""
import json, socket, sys, time
server, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conns, refused = [], 0
for _ in range(n):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect((server, 53)); conns.append(s)
    except OSError:
        refused += 1
msg = b"\x00\x20" + b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x00" * 18
closed, t0 = set(), time.monotonic()
i = 0
while time.monotonic() - t0 < seconds and len(closed) < len(conns):
    for k, s in enumerate(conns):
        if k in closed:
            continue
        try:
            s.send(msg[i % len(msg):i % len(msg) + 1])
        except OSError:
            closed.add(k)
    i += 1
    time.sleep(1.0)
print(json.dumps({"opened": len(conns), "refused": refused, "closed_by_server": len(closed)}))
"""

# A connection opened while the name is allowed, kept open past its TTL, then used again.
_LONG_LIVED = r"""
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.sendall(b"x"); time.sleep(float(sys.argv[3])); s.sendall(b"y"); s.shutdown(socket.SHUT_WR)
try:
    while s.recv(4096): pass
    print(json.dumps({"ok": True}))
except OSError as exc:
    print(json.dumps({"ok": False, "error": str(exc)}))
"""


def _py(pod: Pod, code: str, *args: str, timeout: float = 60) -> Any:
    res = pod.exec([sys.executable, "-c", code, *args], timeout=timeout)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _timed_dig(pod: Pod, server: str, name: str, *, tcp: bool = False) -> tuple[str, float]:
    started = time.monotonic()
    status, _ = dig(pod, server, name, tcp=tcp)
    return status, time.monotonic() - started


class HostileBed:
    def __init__(self, tb: Testbed, tmp: Path) -> None:
        self.tb = tb
        self.dns = tb.add_pod("dns")
        self.rogue = tb.add_pod("rogue")
        self.web = tb.add_pod("web")
        self.other = tb.add_pod("other")
        self.client = tb.add_pod("client")
        self.bystander = tb.add_pod("bystander")
        self.degraded = tb.add_pod("degraded")
        self.dns_log = tmp / "dns.log"
        self.rogue_log = tmp / "rogue.log"
        # TTL 2 s: the long-lived-connection test outlives it.
        tb.start_dnsmasq(self.dns, hosts={"allowed.example.test": [self.web.ipv4],
                                          "denied.example.test": [self.other.ipv4],
                                          "api.short.test": [self.web.ipv4]},
                         log_path=str(self.dns_log), ttl=2)
        tb.start_dnsmasq(self.rogue, hosts={"allowed.example.test": [self.other.ipv4]}, log_path=str(self.rogue_log))
        self.web_sink = tb.start_tcp_sink(self.web, WEB_PORT)
        tb.start_tcp_sink(self.other, WEB_PORT)
        self.policies = tmp / "policies"
        self.policies.mkdir()
        (self.policies / "policies.yaml").write_text(POLICIES)
        self.pods_file = tmp / "pods.yaml"
        labels = {"bystander": "client"}
        self.pods_file.write_text(yaml.safe_dump({"pods": [
            {"name": p.name, "namespace": "default", "ips": [p.ipv4], "labels": {"app": labels.get(p.name, p.name)}}
            for p in (self.dns, self.rogue, self.web, self.other, self.client, self.bystander, self.degraded)]}))


@pytest.fixture(scope="module")
def hbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileBed]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    Testbed.cleanup_stale()
    with Testbed() as tb:
        yield HostileBed(tb, tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def hproxy(hbed: HostileBed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, str, str, Agent]]:
    tmp = tmp_path_factory.mktemp("hostile-proxy")
    pin_dir = f"/sys/fs/bpf/flowtel/dnsproxy-test-t{os.getpid()}"  # the one Proxy will use
    shutil.rmtree(pin_dir, ignore_errors=True)
    agent = Agent(hbed, pin_dir, tmp)  # type: ignore[arg-type] - it reads only pods_file
    metrics, health = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    # No --upstream: each allowed query goes to the resolver the pod asked, as in a cluster.
    proxy = Proxy(hbed, tmp, upstream=None,  # type: ignore[arg-type] - it reads policies and pods_file
                  extra=("--metrics-listen", metrics, "--health-listen", health, "--min-ttl", "0"))
    try:
        assert proxy.pin_dir == pin_dir
        agent.wait("the receiver to find the proxy's pins",
                   lambda: agent.service.telemetry.snapshot().get(("fqdnpolicy", "maps_attached")) == 1)
        yield proxy, f"http://{metrics}/metrics", f"http://{health}/healthz", agent
    finally:
        proxy.close()
        agent.stop()


def _healthz(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_a_rogue_resolver_is_never_asked_and_the_drop_is_reported(hbed: HostileBed,
                                                                  hproxy: tuple[Proxy, str, str, Agent]) -> None:
    proxy, metrics, _, agent = hproxy
    hbed.rogue_log.write_text("")
    # The allowed name, asked of a resolver the DNS rule does not select: dropped in the datapath.
    assert dig(hbed.client, hbed.rogue.ipv4, "allowed.example.test")[0] == "TIMEOUT"
    assert dig(hbed.client, hbed.rogue.ipv4, "allowed.example.test", tcp=True)[0] != "NOERROR"
    assert "allowed.example.test" not in hbed.rogue_log.read_text()  # never forwarded, never proxied
    # What the rogue would have answered was never learned.
    assert not connect(hbed.client, hbed.other.ipv4)
    # Reported: the kernel's counters through the agent, and the proxy's own flow log.
    def drops() -> float:
        got = series(scrape(agent.url), "hubble_drop_total", reason="POLICY_DENIED", protocol="UDP",
                     source="default/client", destination="default/rogue")
        return sum(got.values())
    agent.wait("hubble_drop_total for the DNS to the rogue resolver", lambda: drops() >= 1)
    flow = proxy.wait_flow(lambda f: f["verdict"] == "DROPPED" and f.get("IP", {}).get("destination") == hbed.rogue.ipv4
                           and f.get("l4", {}).get("UDP", {}).get("destination_port") == 53, timeout=10)
    assert flow["drop_reason_desc"] == "POLICY_DENIED"
    # The allowed resolver still answers, through the proxy.
    assert dig(hbed.client, hbed.dns.ipv4, "allowed.example.test") == ("NOERROR", [hbed.web.ipv4])


def test_smuggled_questions_never_reach_the_resolver(hbed: HostileBed, hproxy: tuple[Proxy, str, str, Agent]) -> None:
    _, metrics, _, _ = hproxy
    hbed.dns_log.write_text("")
    assert _py(hbed.client, _RAW, "two-questions", hbed.dns.ipv4, "1") == [1]  # FORMERR
    assert _py(hbed.client, _RAW, "update", hbed.dns.ipv4, "1") == [5]  # REFUSED
    assert _py(hbed.client, _RAW, "additional", hbed.dns.ipv4, "1") == [1]
    log = hbed.dns_log.read_text()
    assert "denied" not in log and "example.test" not in log, log  # nothing of them was forwarded
    page = scrape(metrics)
    rejected = {dict(k)["reason"]: v for k, v in series(page, "flowtel_dnsproxy_queries_rejected_total").items()}
    assert rejected["question_count"] >= 1 and rejected["opcode"] >= 1 and rejected["records"] >= 1


def test_hostile_traffic_leaves_every_other_pods_dns_working(hbed: HostileBed,
                                                              hproxy: tuple[Proxy, str, str, Agent]) -> None:
    proxy, metrics, healthz, _ = hproxy
    dns_ip = hbed.dns.ipv4
    baseline = [_timed_dig(hbed.bystander, dns_ip, "allowed.example.test") for _ in range(5)]
    assert all(s == "NOERROR" for s, _ in baseline), baseline
    base = statistics.median(t for _, t in baseline)

    # The attack: responses (QR=1), long names against the many-star pattern, slow-drip TCP.
    drip = hbed.client.popen([sys.executable, "-c", _DRIP, dns_ip, "24", "12"], stdout=-1, text=True)
    responses = _py(hbed.client, _RAW, "response", dns_ip, "50")
    assert responses == [None] * 50  # dropped, never answered
    long_rcodes = _py(hbed.client, _RAW, "long", dns_ip, "200", "x" + LONG_NAME)
    assert set(long_rcodes) == {5}, long_rcodes  # REFUSED, each in time linear in the name
    during = [_timed_dig(hbed.bystander, dns_ip, "allowed.example.test") for _ in range(5)]
    during += [_timed_dig(hbed.bystander, dns_ip, "allowed.example.test", tcp=True) for _ in range(3)]
    assert all(s == "NOERROR" for s, _ in during), during
    # "Normal latency" on a shared, loaded machine: the median within 0.25 s of the baseline's.
    assert statistics.median(t for _, t in during) < base + 0.25, (baseline, during)
    assert _healthz(healthz) == 200

    out, _ = drip.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    # 16 connections per client; the others are closed at once; the rest cut at the message deadline.
    assert result["opened"] + result["refused"] == 24
    assert result["closed_by_server"] == result["opened"], result
    page = scrape(metrics)
    errors = {dict(k)["kind"]: v for k, v in series(page, "flowtel_dnsproxy_server_client_errors_total",
                                                     server="dns-tcp").items()}
    assert errors["rejected"] >= 8 and errors["timeout"] >= 16 - 8, errors
    rejected = {dict(k)["reason"]: v for k, v in series(page, "flowtel_dnsproxy_queries_rejected_total").items()}
    assert rejected["response"] >= 50
    assert dig(hbed.bystander, dns_ip, "allowed.example.test", tcp=True)[0] == "NOERROR"


def test_a_policy_with_an_unsupported_field_denies_and_is_reported(hbed: HostileBed,
                                                                    hproxy: tuple[Proxy, str, str, Agent]) -> None:
    proxy, metrics, _, _ = hproxy
    # Policed (its DNS goes through the proxy), resolving works (an L4-only DNS rule: any name) ...
    assert dig(hbed.degraded, hbed.dns.ipv4, "denied.example.test") == ("NOERROR", [hbed.other.ipv4])
    # ... but the named port cannot be resolved: traffic to the web pod is denied, never allowed.
    assert not connect(hbed.degraded, hbed.web.ipv4)
    assert not connect(hbed.degraded, hbed.other.ipv4)
    page = scrape(metrics)
    degraded = series(page, "flowtel_dnsproxy_policy_degraded")
    assert any("degraded-egress" in dict(k)["policy"] for k in degraded), degraded
    assert "policy degraded" in proxy.log.read_text() and "named port 'http-alt'" in proxy.log.read_text()


def test_an_open_connection_outlives_the_answers_ttl(hbed: HostileBed, hproxy: tuple[Proxy, str, str, Agent]) -> None:
    # TTL 2 s, --min-ttl 0, no grace: a new connection after 3 s is denied, an open one is not.
    assert dig(hbed.client, hbed.dns.ipv4, "api.short.test") == ("NOERROR", [hbed.web.ipv4])
    before = len(hbed.web_sink.records())
    assert _py(hbed.client, _LONG_LIVED, hbed.web.ipv4, str(WEB_PORT), "3.5") == {"ok": True}
    got = hbed.web_sink.wait_records(before + 1)[-1]
    assert got["bytes"] == 2, got  # both bytes, the second sent after the TTL
    assert not connect(hbed.client, hbed.web.ipv4)  # a new connection now: denied
