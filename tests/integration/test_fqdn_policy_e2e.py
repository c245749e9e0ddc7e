"""FQDN egress policy end to end: `flowtel dnsproxy` as its own process, real kernel, real pods.

Pods: "dns" (dnsmasq, the upstream and the client's configured resolver), "web" (the name's
answer, a TCP sink), "other" (a TCP sink nobody resolves), "client" (policed), "free" (no
policy). Truth: what dig and the client's sockets see, dnsmasq's query log, a capture of the
client's SYNs, the pinned counters and allow map, and the proxy's flow log.
"""
from __future__ import annotations

from tests.support.flowlog import read_flow_log

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from dnsproxy.datapath import Datapath, uninstall
from testbed import Pod, Testbed, capture

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
WEB_PORT = 8080

_CONNECT = r"""
import json, socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.sendall(b"x"); s.shutdown(socket.SHUT_WR)
    while s.recv(4096): pass
    print(json.dumps({"ok": True}))
except OSError as exc:
    print(json.dumps({"ok": False, "error": str(exc)}))
"""


def connect(pod: Pod, ip: str, timeout: float = 0.8) -> bool:
    """A TCP connection with a timeout below the first SYN retransmission (1 s): it succeeds
    only if the very first SYN got through."""
    res = pod.exec([sys.executable, "-c", _CONNECT, ip, str(WEB_PORT), str(timeout)], timeout=30)
    return bool(json.loads(res.stdout.strip().splitlines()[-1])["ok"])


def dig(pod: Pod, server: str, name: str, *, tcp: bool = False) -> tuple[str, list[str]]:
    argv = ["dig", "+time=2", "+tries=1", f"@{server}", name, "A"]
    if tcp:
        argv.append("+tcp")
    out = pod.exec(argv, check=False, timeout=15).stdout
    status = out.split("status: ", 1)[1].split(",", 1)[0] if "status: " in out else "TIMEOUT"
    answers = [line.split()[-1] for line in out.split("ANSWER SECTION:", 1)[-1].splitlines()[1:]
               if line.strip() and not line.startswith(";") and " A " in line.replace("\t", " ")] \
        if "ANSWER SECTION:" in out else []
    return status, answers


POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: dns}}, {matchLabels: {app: dns-short}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchName: allowed.example.test}, {matchPattern: "*.short.test"}]
  - toFQDNs: [{matchName: allowed.example.test}, {matchPattern: "*.short.test"}]
    toPorts: [{ports: [{port: "%d", protocol: TCP}]}]
""" % WEB_PORT

BROKEN = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: broken-policy, namespace: default}
spec:
  endpointSelector: {}
  egress: [{toEntities: [world], toCIDR: [10.0.0.0/8]}]  # Cilium rejects it too: one L3 kind per rule
"""


class Bed:
    def __init__(self, tb: Testbed, tmp: Path) -> None:
        self.tb = tb
        self.dns = tb.add_pod("dns")
        self.dns_short = tb.add_pod("dns-short")
        self.web = tb.add_pod("web")
        self.other = tb.add_pod("other")
        self.client = tb.add_pod("client")
        self.free = tb.add_pod("free")
        self.dns_log = tmp / "dnsmasq.log"
        tb.start_dnsmasq(self.dns, hosts={"allowed.example.test": [self.web.ipv4],
                                          "denied.example.test": [self.other.ipv4]},
                         log_path=str(self.dns_log))
        self.dns_short_proc = self.start_short(self.web.ipv4)
        tb.start_tcp_sink(self.web, WEB_PORT)
        tb.start_tcp_sink(self.other, WEB_PORT)
        self.policies = tmp / "policies"
        self.policies.mkdir()
        (self.policies / "client.yaml").write_text(POLICY)
        (self.policies / "broken.yaml").write_text(BROKEN)
        self.pods_file = tmp / "pods.yaml"
        self.pods_file.write_text(yaml.safe_dump({"pods": [
            {"name": p.name, "namespace": "default", "ips": [p.ipv4], "labels": {"app": p.name}}
            for p in (self.dns, self.dns_short, self.web, self.other, self.client, self.free)]}))


    def start_short(self, ip: str) -> subprocess.Popen[Any]:
        """dnsmasq with a 2 s TTL answering api.short.test with ``ip``."""
        return self.tb.start_dnsmasq(self.dns_short, hosts={"api.short.test": [ip]}, ttl=2)

    def move_short(self, ip: str) -> None:
        self.dns_short_proc.kill()
        self.dns_short_proc.wait(10)
        self.dns_short_proc = self.start_short(ip)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    Testbed.cleanup_stale()
    with Testbed() as tb:
        yield Bed(tb, tmp_path_factory.mktemp("fqdn"))


class Proxy:
    """`flowtel dnsproxy` as a child process with its own pin dir, nft table and listen address
    (all derived from the test process's pid, so concurrent runs do not collide)."""

    # Subclasses that build their own argv (test_fqdn_kube_e2e.py) use the shared defaults.
    route: tuple[int, int, int] | None = None

    def __init__(self, bed: Bed, tmp: Path, *, upstream: str | None, audit: bool = False,
                 extra: tuple[str, ...] = (), instance: int = 0, policies: Path | None = None,
                 route: tuple[int, int, int] | None = None) -> None:
        # `instance` > 0: a second proxy beside the first (its own pins, table, label, address).
        # `route`: (tproxy mark, route table, rule priority) of its own instead of the defaults
        # every proxy on the machine shares (for a test that deletes or checks them).
        self.route = route
        route_args = (("--tproxy-mark", hex(route[0]), "--route-table", str(route[1]), "--rule-priority",
                       str(route[2])) if route else ())
        tag = f"t{os.getpid()}" + (f"i{instance}" if instance else "")
        self.pin_dir = f"/sys/fs/bpf/flowtel/dnsproxy-test-{tag}"
        self.nft_table = f"ftdnsproxy_{tag}"
        self.label = f"lo:ft{tag}"[:15]
        self.flow_log = tmp / f"proxy-flows{instance or ''}.log"
        self.log = tmp / f"proxy{instance or ''}.log"
        self.argv = [sys.executable, "-m", "flowtel.cli", "dnsproxy", "--policies", str(policies or bed.policies),
                     "--pods", str(bed.pods_file), *(("--upstream", f"{upstream}:53") if upstream else ()),
                     "--listen", f"169.254.{53 + instance}.{os.getpid() % 250 + 2}:53",
                     "--flow-log", str(self.flow_log), "--pin-dir", self.pin_dir, "--nft-table", self.nft_table,
                     "--address-label", self.label, "--reload-interval", "0.2", "--status-interval", "0.5",
                     # No fixed loopback ports: another proxy (a concurrent run, a node's own) may
                     # hold the defaults. A test that scrapes or probes passes its own in `extra`
                     # (argparse: the later flag wins).
                     "--metrics-listen=", "--health-listen=",
                     # These tests watch TTLs of seconds expire: no minimum (the default is
                     # Cilium's 3600 s). A test that wants one passes it in `extra`.
                     "--min-ttl", "0", *route_args, *extra]
        if audit:
            self.argv.append("--audit")
        self.bed = bed
        self.uninstall()
        self.proc: subprocess.Popen[Any] | None = None
        self.start()

    def start(self) -> None:
        mark = self.log.read_text().count("dnsproxy ready") if self.log.exists() else 0
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while self.log.read_text().count("dnsproxy ready") <= mark:
            assert self.proc.poll() is None, f"dnsproxy exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "dnsproxy did not become ready"
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def flows(self) -> list[dict[str, Any]]:
        if not self.flow_log.exists():
            return []
        # The proxy's own flow log, every line parsed strictly as Cilium's GetFlowsResponse.
        return [env["flow"] for env in read_flow_log(self.flow_log) if "flow" in env]

    def wait_flow(self, pred: Any, timeout: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for f in self.flows():
                if pred(f):
                    return f
            assert time.monotonic() < deadline, f"no matching flow in {self.flows()}"
            time.sleep(0.05)

    def uninstall(self) -> list[str]:
        if self.route is None:
            return uninstall(self.pin_dir, nft_table=self.nft_table, address_label=self.label)
        mark, table, priority = self.route
        return uninstall(self.pin_dir, nft_table=self.nft_table, address_label=self.label, tproxy_mark=mark,
                         route_table=table, rule_priority=priority)

    def close(self) -> None:
        self.stop()
        self.uninstall()


@pytest.fixture
def datapath_view() -> Iterator[Any]:
    views: list[Datapath] = []

    def open_view(proxy: Proxy) -> Datapath:
        # A second loader over the same pins: what a restarted proxy does, and how tests read maps.
        d = Datapath(proxy.pin_dir, nft_table=proxy.nft_table, address_label=proxy.label)
        views.append(d)
        return d

    yield open_view
    for d in views:
        d.close()


@pytest.fixture
def proxy(bed: Bed, tmp_path: Path) -> Iterator[Proxy]:
    p = Proxy(bed, tmp_path, upstream=bed.dns.ipv4)
    yield p
    p.close()


def _syns(lines: list[str], dst: str) -> int:
    return sum(1 for line in lines if f"> {dst}.{WEB_PORT}:" in line and "Flags [S]," in line)


def test_enforcement_end_to_end(bed: Bed, proxy: Proxy, datapath_view: Any) -> None:
    view = datapath_view(proxy)
    before = view.counters()

    # The broken policy is rejected by name; the good one is enforced anyway.
    assert "broken-policy" in proxy.log.read_text() and "combining toCIDR and toEntities" in proxy.log.read_text()

    # Allowed name: answered through the proxy although the client asks the dns pod directly.
    bed.dns_log.write_text("")
    with capture(bed.client, filter_expr=f"tcp and host {bed.web.ipv4}") as lines:
        status, answers = dig(bed.client, bed.dns.ipv4, "allowed.example.test")
        assert (status, answers) == ("NOERROR", [bed.web.ipv4])
        assert (bed.client.ipv4, bed.web.ipv4) in view.allowed_entries()
        assert connect(bed.client, bed.web.ipv4)
    assert _syns(lines, bed.web.ipv4) == 1, lines  # the first SYN passed: no retransmission
    query_log = bed.dns_log.read_text()
    assert "allowed.example.test" in query_log and f"from {bed.client.ipv4}" not in query_log  # the proxy asked
    proxy.wait_flow(lambda f: f.get("l7", {}).get("dns", {}).get("query", "").startswith("allowed.example.test")
                    and f["verdict"] == "FORWARDED")

    # Same over TCP.
    assert dig(bed.client, bed.dns.ipv4, "allowed.example.test", tcp=True) == ("NOERROR", [bed.web.ipv4])

    # Denied name: REFUSED by the proxy, never asked upstream.
    bed.dns_log.write_text("")
    assert dig(bed.client, bed.dns.ipv4, "denied.example.test")[0] == "REFUSED"
    assert dig(bed.client, bed.dns.ipv4, "denied.example.test", tcp=True)[0] == "REFUSED"
    assert "denied.example.test" not in bed.dns_log.read_text()
    refused = proxy.wait_flow(lambda f: f.get("l7", {}).get("dns", {}).get("query", "").startswith("denied"))
    assert refused["verdict"] == "DROPPED"

    # An address the client never resolved: dropped, counted, reported.
    assert not connect(bed.client, bed.other.ipv4)
    after = view.counters()
    assert after["dropped"] > before["dropped"]
    assert after["allowed_fqdn"] > before["allowed_fqdn"]
    drop = proxy.wait_flow(lambda f: f["verdict"] == "DROPPED" and f.get("IP", {}).get("destination") == bed.other.ipv4)
    assert drop["drop_reason_desc"] == "POLICY_DENIED"
    assert drop["IP"]["source"] == bed.client.ipv4

    # The allowed IP is open on the policy's port only.
    dropped = view.counters()["dropped"]
    res = bed.client.exec([sys.executable, "-c", _CONNECT.replace("int(sys.argv[2])", "9"), bed.web.ipv4, "0", "0.5"])
    assert not json.loads(res.stdout)["ok"]
    assert view.counters()["dropped"] > dropped

    # A pod without policy is untouched: its DNS is not redirected and it reaches anything.
    bed.dns_log.write_text("")
    assert dig(bed.free, bed.dns.ipv4, "denied.example.test") == ("NOERROR", [bed.other.ipv4])
    assert f"from {bed.free.ipv4}" in bed.dns_log.read_text()
    assert connect(bed.free, bed.other.ipv4)

    # The proxy reports its own health: decisions and the datapath's counters.
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in proxy.log.read_text().splitlines() if " status: " in line]
        status = json.loads(lines[-1].split(" status: ", 1)[1]) if lines else {}
        if status.get("queries_refused", 0) >= 2 and status.get("datapath", {}).get("dropped", 0) >= 2:
            break
        assert time.monotonic() < deadline, f"no status line with the test's decisions: {lines[-1:]}"
        time.sleep(0.1)
    assert status["queries_allowed"] >= 2 and status["learned_ips"] >= 1 and status["policies_rejected"] == 1


def test_restart_keeps_enforcement_and_learned_ips(bed: Bed, proxy: Proxy, datapath_view: Any) -> None:
    assert dig(bed.client, bed.dns.ipv4, "allowed.example.test") == ("NOERROR", [bed.web.ipv4])
    proxy.kill()
    # Proxy gone: learned IPs keep working and everything else stays dropped (pinned maps,
    # filters still attached).
    assert connect(bed.client, bed.web.ipv4)
    assert not connect(bed.client, bed.other.ipv4)
    proxy.start()
    view = datapath_view(proxy)
    assert (bed.client.ipv4, bed.web.ipv4) in view.allowed_entries()
    assert connect(bed.client, bed.web.ipv4)
    assert not connect(bed.client, bed.other.ipv4)
    assert dig(bed.client, bed.dns.ipv4, "allowed.example.test") == ("NOERROR", [bed.web.ipv4])


def test_audit_mode_reports_without_dropping(bed: Bed, tmp_path: Path, datapath_view: Any) -> None:
    p = Proxy(bed, tmp_path, upstream=bed.dns.ipv4, audit=True)
    try:
        view = datapath_view(p)
        assert connect(bed.client, bed.other.ipv4)
        counters = view.counters()
        assert counters["audit"] > 0 and counters["dropped"] == 0
        p.wait_flow(lambda f: f["verdict"] == "AUDIT" and f.get("IP", {}).get("destination") == bed.other.ipv4)
    finally:
        p.close()


def test_ttl_expiry_stops_allowing(bed: Bed, tmp_path: Path, datapath_view: Any) -> None:
    p = Proxy(bed, tmp_path, upstream=bed.dns_short.ipv4, extra=("--grace", "1"))
    try:
        view = datapath_view(p)
        assert dig(bed.client, bed.dns_short.ipv4, "api.short.test") == ("NOERROR", [bed.web.ipv4])
        assert connect(bed.client, bed.web.ipv4)
        expires, until = view.allowed_entries()[(bed.client.ipv4, bed.web.ipv4)]
        assert until - expires == 1_000_000_000
        time.sleep(max(0.0, (until - time.monotonic_ns()) / 1e9) + 0.2)  # TTL 2 s + grace 1 s
        assert not connect(bed.client, bed.web.ipv4)
    finally:
        p.close()


def test_policy_change_is_reloaded(bed: Bed, proxy: Proxy) -> None:
    assert dig(bed.client, bed.dns.ipv4, "denied.example.test")[0] == "REFUSED"
    extra = textwrap.dedent("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: client-more, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: client}}
          egress:
          - toPorts: [{ports: [{port: "53"}], rules: {dns: [{matchName: denied.example.test}]}}]
          - toCIDR: ["%s/32"]
        """ % bed.other.ipv4)
    path = bed.policies / "more.yaml"
    path.write_text(extra)
    try:
        deadline = time.monotonic() + 10
        while dig(bed.client, bed.dns.ipv4, "denied.example.test")[0] != "NOERROR":
            assert time.monotonic() < deadline, "the new policy was not loaded"
            time.sleep(0.2)
        assert connect(bed.client, bed.other.ipv4)  # toCIDR compiled into the LPM map
    finally:
        path.unlink()
    deadline = time.monotonic() + 10
    while dig(bed.client, bed.dns.ipv4, "denied.example.test")[0] != "REFUSED":
        assert time.monotonic() < deadline, "the removed policy was still applied"
        time.sleep(0.2)
    assert not connect(bed.client, bed.other.ipv4)


def test_changed_answer_moves_the_allowance(bed: Bed, tmp_path: Path, datapath_view: Any) -> None:
    p = Proxy(bed, tmp_path, upstream=bed.dns_short.ipv4)
    try:
        view = datapath_view(p)
        assert dig(bed.client, bed.dns_short.ipv4, "api.short.test") == ("NOERROR", [bed.web.ipv4])
        assert connect(bed.client, bed.web.ipv4)
        assert not connect(bed.client, bed.other.ipv4)
        bed.move_short(bed.other.ipv4)
        assert dig(bed.client, bed.dns_short.ipv4, "api.short.test") == ("NOERROR", [bed.other.ipv4])
        assert connect(bed.client, bed.other.ipv4)  # the new address, on its first SYN
        _, old_until = view.allowed_entries()[(bed.client.ipv4, bed.web.ipv4)]
        time.sleep(max(0.0, (old_until - time.monotonic_ns()) / 1e9) + 0.2)
        dropped = view.counters()["dropped"]
        assert not connect(bed.client, bed.web.ipv4)  # the old one is gone after its TTL
        assert view.counters()["dropped"] > dropped
        # The proxy's clean-up deletes entries past their deadline (the datapath ignores them anyway).
        deadline = time.monotonic() + 5
        while (bed.client.ipv4, bed.web.ipv4) in view.allowed_entries():
            assert time.monotonic() < deadline, "expired entry was not removed"
            time.sleep(0.1)
    finally:
        p.close()
        bed.move_short(bed.web.ipv4)


def _agent_attached(ifname: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", ifname, "ingress"], capture_output=True, text=True).stdout
    return "flowtel_" in out


def test_agent_restart_does_not_disturb_dns_or_enforcement(bed: Bed, proxy: Proxy, tmp_path: Path,
                                                           datapath_view: Any) -> None:
    """The observability agent attaches its own filters to the same veths; killing and
    restarting it while the client resolves and connects in a loop must not matter."""
    view = datapath_view(proxy)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "receivers": {"ebpf": {"interfaces": [f"{bed.tb.prefix}*"], "collection_interval": "1s"}},
        "exporters": {"file": {"path": str(tmp_path / "agent-flows.log")}},
        "service": {"pipelines": {"logs": {"receivers": ["ebpf"], "exporters": ["file"]}}},
    }))
    agent_log = tmp_path / "agent.log"

    def start_agent() -> subprocess.Popen[Any]:
        with open(agent_log, "a") as out:
            proc = subprocess.Popen([sys.executable, "-m", "flowtel.cli", "run", "--config", str(config)],
                                    cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while not _agent_attached(bed.client.host_ifname):
            assert proc.poll() is None, f"agent exited: {agent_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "agent did not attach"
            time.sleep(0.1)
        return proc

    failures: list[str] = []
    stop = threading.Event()
    rounds = [0]

    def loop() -> None:
        while not stop.is_set():
            status, answers = dig(bed.client, bed.dns.ipv4, "allowed.example.test")
            if (status, answers) != ("NOERROR", [bed.web.ipv4]):
                failures.append(f"dig: {status} {answers}")
            if not connect(bed.client, bed.web.ipv4):
                failures.append("connect to the allowed address failed")
            rounds[0] += 1

    dropped = view.counters()["dropped"]
    agent = start_agent()
    worker = threading.Thread(target=loop)
    worker.start()
    try:
        for _ in range(2):
            time.sleep(1.0)
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            time.sleep(0.5)
            agent = start_agent()
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(60)
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    assert rounds[0] >= 5
    assert failures == []
    assert view.counters()["dropped"] == dropped  # no unexpected drop
    assert not connect(bed.client, bed.other.ipv4)  # and enforcement is still on


def _has_policy_filter(ifname: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", ifname, "ingress"], capture_output=True, text=True).stdout
    return "handle 0xf1d0" in out


def test_uninstall_leaves_another_proxys_enforcement(bed: Bed, proxy: Proxy, tmp_path: Path,
                                                     datapath_view: Any) -> None:
    """Two proxies (own pins, nft tables, addresses) police two pods; uninstalling one, with its
    pins or after they were deleted, leaves the other's filters, redirect and drops intact."""
    policies = tmp_path / "policies-free"
    policies.mkdir()
    (policies / "free.yaml").write_text(POLICY.replace("client-egress", "free-egress").replace("app: client", "app: free"))
    second = Proxy(bed, tmp_path, upstream=bed.dns.ipv4, instance=1, policies=policies)
    client_if, free_if = bed.client.host_ifname, bed.free.host_ifname
    try:
        view = datapath_view(proxy)
        # The second proxy's start-up sweep left the first one's filter alone: both enforce.
        assert _has_policy_filter(client_if) and _has_policy_filter(free_if)
        assert not connect(bed.client, bed.other.ipv4)
        assert not connect(bed.free, bed.other.ipv4)

        second.close()  # stop, then uninstall over its pins
        assert not _has_policy_filter(free_if) and _has_policy_filter(client_if)
        dropped = view.counters()["dropped"]
        assert not connect(bed.client, bed.other.ipv4)
        assert view.counters()["dropped"] > dropped
        # The shared policy rule and route stayed: the first proxy still answers its pod's DNS.
        assert dig(bed.client, bed.dns.ipv4, "allowed.example.test") == ("NOERROR", [bed.web.ipv4])
        assert connect(bed.free, bed.other.ipv4)

        # Pins gone before the uninstall (a proxy killed, its pin dir deleted): only filters whose
        # maps are pinned nowhere go, so the second proxy's orphans and never the first one's.
        second.start()
        assert _has_policy_filter(free_if) and not connect(bed.free, bed.other.ipv4)
        second.kill()
        shutil.rmtree(second.pin_dir)
        removed = uninstall(second.pin_dir, nft_table=second.nft_table, address_label=second.label)
        assert f"filter {free_if} ffff:fff2" in removed and f"filter {free_if} ffff:fff3" in removed
        assert not any(client_if in item for item in removed)
        assert _has_policy_filter(client_if)
        dropped = view.counters()["dropped"]
        assert not connect(bed.client, bed.other.ipv4)
        assert view.counters()["dropped"] > dropped
        assert connect(bed.free, bed.other.ipv4)
    finally:
        second.close()
