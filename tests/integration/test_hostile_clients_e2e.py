"""The real agent (`flowtel run` with a config) against hostile clients: a pod of the testbed
(a network namespace joined to the host by a veth) is the attacker, and reaches the agent's
servers on an address of the host side of its veth, as a pod reaches a hostNetwork agent's
`0.0.0.0` ports on a node. The operator's view (health, /metrics) is on the host's loopback.

Each finding of issue 15 is reproduced and the fixed behaviour asserted:
- a worst-case FQDN filter (`*****************q` against a long queried name) while the
  agent's health answers within 100 ms (95% of probes every 20 ms; every one within 1 s:
  the machine is shared, and the prober itself gets descheduled; the old regex stalled the
  agent until the client's 60 s timeout and SIGTERM no longer stopped it);
- idle connections beyond the cap are answered 503 and closed, those within it are closed
  after the idle timeout, a slow header after the read timeout; resident memory stays bounded;
- Host (DNS rebinding) and Origin / Sec-Fetch-Site (cross-site) checks;
- invalid parameters (non-ASCII digits, absurd durations, NUL in the path) get a 400 with a
  message; client resets and errors are counted in /metrics and no traceback is logged.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest

from testbed import Pod, Testbed
from tests.integration.test_fqdn_policy_e2e import dig
from tests.support.otlp_receiver import free_port

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
CAP = 16  # max_connections of every attacked server
EXTRA = 300  # connections beyond it, one after another
IDLE_S = 3
READ_S = 2
# 62 characters without a "q": Python's backtracking regex for 17 stars tries every way of
# splitting it into 17 pieces, C(78, 16) ~ 10^16 of them.
LONG_LABEL = "a" * 62
HOSTILE_NAME = f"{LONG_LABEL}.{LONG_LABEL}.example"
WORST_FILTER = "*" * 17 + "q"


class Agent:
    """`flowtel run` in a subprocess: health on the host's loopback, the attacked servers on
    ``attack_ip`` (an address of the attacker pod's host-side veth)."""

    def __init__(self, tmp: Path, glob: str, attack_ip: str) -> None:
        self.health = f"127.0.0.1:{free_port()}"
        self.metrics_port, self.flows_port, self.ui_port = free_port(), free_port(), free_port()
        self.attack_ip = attack_ip
        limits = f"max_connections: {CAP}, idle_timeout: {IDLE_S}s, read_timeout: {READ_S}s"
        config = tmp / "agent.yaml"
        config.write_text(textwrap.dedent(f"""\
            receivers:
              ebpf: {{interfaces: ["{glob}"], collection_interval: 300ms}}
            exporters:
              prometheus: {{endpoint: "{attack_ip}:{self.metrics_port}", {limits}}}
              file: {{path: "{tmp / 'flows.log'}"}}
            extensions:
              health_check: {{endpoint: "{self.health}"}}
              flows: {{endpoint: "{attack_ip}:{self.flows_port}", max_followers: 4, {limits}}}
              ui: {{endpoint: "{attack_ip}:{self.ui_port}", max_followers: 4, {limits}}}
            service:
              extensions: [health_check, flows, ui]
              pipelines:
                logs: {{receivers: [ebpf], exporters: [file]}}
                metrics: {{receivers: [ebpf], exporters: [prometheus]}}
            """))
        self.stderr_path = tmp / "agent.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowtel.cli", "run", "--config", str(config)], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=self.stderr_path.open("w"),
            env={**os.environ, "NODE_NAME": "hostile-test-node", "PYTHONDONTWRITEBYTECODE": "1"},
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"agent exited {self.proc.returncode}:\n{self.stderr()[-3000:]}"
            try:
                if self.get(self.health, "/")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"agent not ready in {timeout} s:\n{self.stderr()[-3000:]}")

    @staticmethod
    def get(endpoint: str, path: str, headers: dict[str, str] | None = None,
            timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
        host, port = endpoint.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()

    def metric(self, name: str, component: str) -> float:
        _, body, _ = self.get(f"{self.attack_ip}:{self.metrics_port}", "/metrics")
        prefix = f'{name}{{component="{component}"}} '
        for line in body.decode().splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix):])
        return 0.0

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


class HealthWatch:
    """Probes health on one keep-alive connection every 20 ms, as a kubelet would (faster)."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=5)
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.conn.request("GET", "/livez")
                resp = self.conn.getresponse()
                resp.read()
                if resp.status != 200:
                    self.errors.append(f"status {resp.status}")
            except OSError as exc:
                self.errors.append(repr(exc))
                self.conn.close()
            self.latencies.append(time.monotonic() - started)
            self._stop.wait(0.02)

    def assert_responsive(self) -> None:
        """Health answered all along: every probe within 1 s (the old servers stalled for many
        seconds), and 95% within 100 ms. Not every one: this machine is shared, and a probe
        is also late when the prober itself is descheduled."""
        lat = sorted(self.latencies)
        assert not self.errors, self.errors
        assert len(lat) >= 10, lat
        within = sum(1 for t in lat if t < 0.1) / len(lat)
        print(f"health probes: {len(lat)}, median {lat[len(lat) // 2] * 1000:.1f} ms, "
              f"p95 {lat[int(len(lat) * 0.95)] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")
        assert within >= 0.95 and lat[-1] < 1.0, (within, lat[-5:])

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # An attack that the agent shrugs off in 0.2 s leaves too few probes to judge by: go on
        # probing (just after the attack) until there are ten.
        deadline = time.monotonic() + 5
        while len(self.latencies) < 10 and not self.errors and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(10)
        self.conn.close()


def in_pod(pod: Pod, script: str, *args: str, timeout: float = 120) -> Any:
    """Run a Python script inside the pod; it prints one JSON value."""
    out = pod.exec([sys.executable, "-c", textwrap.dedent(script), *args], timeout=timeout)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testbed, dict[str, Pod], Agent]]:
    Testbed.cleanup_stale()
    tmp = tmp_path_factory.mktemp("hostile")
    with Testbed() as bed:
        pods = {"attacker": bed.add_pod("attacker"), "dns": bed.add_pod("dns")}
        # The host-side address the attacker reaches the agent on (weak host model: any
        # local address is reachable through the pod's default route to the host).
        attack_ip = str(list(bed.ipv4_network.hosts())[-1])
        subprocess.run(["ip", "address", "add", f"{attack_ip}/32", "dev", pods["attacker"].host_ifname],
                       check=True)
        bed.start_dnsmasq(pods["dns"], hosts={"web.example": ["192.0.2.10"]})
        agent = Agent(tmp, bed.interface_glob, attack_ip)
        try:
            agent.wait_ready()
            yield bed, pods, agent
        finally:
            code = agent.stop()
            assert code == 0, f"agent exited {code}:\n{agent.stderr()[-3000:]}"


def test_a_worst_case_fqdn_filter_does_not_stall_the_agent(setup: tuple[Testbed, dict[str, Pod], Agent]) -> None:
    bed, pods, agent = setup
    # A workload queries a long name: the flows API now holds a DNS request flow for it.
    dig(pods["attacker"], pods["dns"].ipv4, HOSTILE_NAME)
    flows_ep = f"{agent.attack_ip}:{agent.flows_port}"
    deadline = time.monotonic() + 20
    while True:
        _, body, _ = agent.get(flows_ep, "/flows?" + urllib.parse.urlencode({"to-fqdn": "*.example"}))
        if HOSTILE_NAME.encode() in body:
            break
        assert time.monotonic() < deadline, "the DNS request flow never reached the flows API"
        time.sleep(0.3)

    script = """
        import json, sys, time, urllib.parse, http.client
        host, port, prefix, pattern = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
        out = []
        for _ in range(5):
            conn = http.client.HTTPConnection(host, port, timeout=60)
            started = time.monotonic()
            conn.request("GET", prefix + "/flows?" + urllib.parse.urlencode({"to-fqdn": pattern}),
                         headers={"Host": host})
            resp = conn.getresponse()
            body = resp.read()
            out.append([resp.status, time.monotonic() - started, len(body)])
            conn.close()
        print(json.dumps(out))
    """
    with HealthWatch(agent.health) as watch:
        for port, prefix in ((agent.flows_port, ""), (agent.ui_port, "/api")):
            results = in_pod(pods["attacker"], script, agent.attack_ip, str(port), prefix, WORST_FILTER)
            assert all(status == 200 for status, _, _ in results), results
            # No name has a "q" at its end: nothing matches, quickly.
            assert all(size == 0 for _, _, size in results), results
            assert max(t for _, t, _ in results) < 2.0, results
        # The same through a pattern that matches the long name: it finds what one star finds.
        results = in_pod(pods["attacker"], script, agent.attack_ip, str(agent.flows_port), "",
                         "*" * 17 + ".example")
        _, plain, _ = agent.get(flows_ep, "/flows?" + urllib.parse.urlencode({"to-fqdn": "*.example"}))
        _, health, _ = agent.get(flows_ep, "/healthz")
        assert all(status == 200 and size == len(plain) > 0 for status, _, size in results), (results, len(plain),
                                                                                              health)
    watch.assert_responsive()
    # A pattern longer than any DNS name is refused, not compiled.
    status, body, _ = agent.get(flows_ep, "/flows?" + urllib.parse.urlencode({"to-fqdn": "*" * 300}))
    assert status == 400 and b"FQDN pattern too long" in body


def test_connections_beyond_the_cap_get_503_and_idle_ones_are_closed(
        setup: tuple[Testbed, dict[str, Pod], Agent]) -> None:
    bed, pods, agent = setup
    script = """
        import json, socket, sys, time
        host, port, cap, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        held = []
        for _ in range(cap):
            held.append(socket.create_connection((host, port), timeout=10))
        time.sleep(1.5)  # the server has accepted them all
        answers = []
        for _ in range(extra):
            s = socket.create_connection((host, port), timeout=10)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            answers.append(data.split(b"\\r\\n", 1)[0].decode())
            s.close()
        # Held connections with no request: closed by the server after its idle timeout.
        started = time.monotonic()
        closed_after = []
        for s in held:
            s.settimeout(30)
            try:
                eof = s.recv(1) == b""
            except ConnectionResetError:
                eof = True
            closed_after.append([eof, time.monotonic() - started])
            s.close()
        print(json.dumps({"answers": answers, "closed": closed_after}))
    """
    agent.metric("flowtel_component_http_requests", "prometheus")  # warm up: the first scrape's allocations
    threads_before = agent.threads()
    rss_after_round: list[int] = []
    for port in (agent.metrics_port, agent.flows_port) * 2:
        with HealthWatch(agent.health) as watch:
            result = in_pod(pods["attacker"], script, agent.attack_ip, str(port), str(CAP), str(EXTRA))
        assert result["answers"] == ["HTTP/1.1 503 Service Unavailable"] * EXTRA
        assert all(eof for eof, _ in result["closed"]), result["closed"]
        # Closed once idle_timeout has passed (the server checks every second).
        assert max(t for _, t in result["closed"]) < IDLE_S + 3, result["closed"]
        watch.assert_responsive()
        # No thread per connection (the old servers started one for each).
        assert agent.threads() == threads_before
        rss_after_round.append(agent.rss_kib())
    # Memory bounded: the connections leave nothing behind. The first round may raise the
    # allocator's high-water mark (the agent gave its start-up heap back to the kernel, so
    # the first 2 x (16 + 300) connections' buffers are new pages; glibc keeps them for
    # reuse until the periodic trim); the same attack again must find them, not grow. (The
    # agent itself grows a little meanwhile, with its flow ring and series.)
    # Measured: +3.5 MB alone, +13 MB inside the full suite (the agent's flow ring and series
    # filling meanwhile); a buffer kept per connection would be ≥ 2 x 316 x 64 KiB ≈ 40 MB.
    first, second = rss_after_round[1], rss_after_round[3]
    assert second - first < 20 * 1024, rss_after_round
    assert agent.metric("flowtel_component_http_connections_rejected", "prometheus") == 2 * EXTRA
    assert agent.metric("flowtel_component_http_connections_rejected", "flows") == 2 * EXTRA
    assert agent.metric("flowtel_component_http_connections_timed_out", "flows") >= CAP


def test_a_slow_request_is_cut_off_after_the_read_timeout(setup: tuple[Testbed, dict[str, Pod], Agent]) -> None:
    bed, pods, agent = setup
    script = """
        import json, socket, sys, time
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
        started = time.monotonic()
        sent = 0
        try:
            for byte in b"GET /flows HTTP/1.1\\r\\nHost: x\\r\\nX-Slow: " + b"a" * 100:
                s.send(bytes([byte]))  # one byte every 0.5 s: never idle, never finished
                sent += 1
                time.sleep(0.5)
            closed = False
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        print(json.dumps({"closed": closed, "after": time.monotonic() - started, "sent": sent}))
    """
    result = in_pod(pods["attacker"], script, agent.attack_ip, str(agent.flows_port))
    assert result["closed"], result
    assert READ_S <= result["after"] < READ_S + 4, result


def test_browser_facing_servers_check_host_and_origin(setup: tuple[Testbed, dict[str, Pod], Agent]) -> None:
    bed, pods, agent = setup
    for ep, path in ((f"{agent.attack_ip}:{agent.flows_port}", "/flows?last=1"),
                     (f"{agent.attack_ip}:{agent.ui_port}", "/api/flows?last=1"),
                     (f"{agent.attack_ip}:{agent.ui_port}", "/")):
        # A rebinding page's requests carry its own name.
        status, body, _ = agent.get(ep, path, {"Host": f"evil.example:{ep.rsplit(':', 1)[1]}"})
        assert status == 403 and b"DNS rebinding" in body, body
        # Cross-site requests a page elsewhere makes (an <img>, a fetch).
        status, body, _ = agent.get(ep, path, {"Sec-Fetch-Site": "cross-site"})
        assert status == 403 and b"cross-site request refused" in body, body
        status, body, _ = agent.get(ep, path, {"Origin": "http://evil.example"})
        assert status == 403 and b"cross-origin request refused" in body, body
        # The UI's own requests, a typed URL, curl: served.
        assert agent.get(ep, path, {"Sec-Fetch-Site": "same-origin", "Origin": f"http://{ep}"})[0] == 200
        assert agent.get(ep, path, {"Sec-Fetch-Site": "none"})[0] == 200
        assert agent.get(ep, path, {"Host": f"localhost:{ep.rsplit(':', 1)[1]}"})[0] == 200
        assert agent.get(ep, path)[0] == 200  # Host: the IP address


@pytest.mark.parametrize("path, message", [
    ("/flows?last=%C2%B2", "last: expected a number"),  # '²' is a digit to str.isdigit
    ("/flows?last=%D9%A3", "last: expected a number"),  # Arabic-Indic three
    ("/flows?since=" + "9" * 400 + "h", "since:"),
    ("/flows?since=9999999999h", "outside the years"),
    ("/flows?until=99999999999999999999999999s", "until:"),
    ("/flows%00", "control character"),
    ("/flows?namespace=%00", "control character"),
    ("/flows?namespace=%FF", "not valid UTF-8"),
    ("/flows?follow=maybe", "follow: expected"),
    ("/map?colour=red", "unknown parameter"),
])
def test_invalid_parameters_get_a_400_with_a_message(setup: tuple[Testbed, dict[str, Pod], Agent],
                                                     path: str, message: str) -> None:
    bed, pods, agent = setup
    status, body, headers = agent.get(f"{agent.attack_ip}:{agent.flows_port}", path)
    assert status == 400, (status, body)
    assert headers["content-type"] == "application/json"
    assert message in json.loads(body)["error"], body


def test_resets_and_errors_are_counted_not_logged(setup: tuple[Testbed, dict[str, Pod], Agent]) -> None:
    bed, pods, agent = setup
    errors_before = agent.metric("flowtel_component_http_client_errors", "flows")
    resets_before = agent.metric("flowtel_component_http_client_resets", "flows")
    script = """
        import json, socket, struct, sys, time
        host, port = sys.argv[1], int(sys.argv[2])
        # Resets: clients that abort (RST) a follow stream, or right after their request.
        for request in (b"GET /flows?follow=1 HTTP/1.1\\r\\nHost: 10.0.0.1\\r\\n\\r\\n",
                        b"GET /flows HTTP/1.1\\r\\nHost: 10.0.0.1\\r\\n\\r\\n"):
            for _ in range(5):
                s = socket.create_connection((host, port), timeout=10)
                s.sendall(request)
                time.sleep(0.3)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        # Client errors, each answered.
        answers = []
        for request in (b"GET /flows HTTP/1.1\\r\\nHost: evil.example\\r\\n\\r\\n",
                        b"GET /flows?last=%C2%B2 HTTP/1.1\\r\\nHost: 10.0.0.1\\r\\n\\r\\n",
                        b"POST /flows HTTP/1.1\\r\\nHost: 10.0.0.1\\r\\nContent-Length: 0\\r\\n\\r\\n",
                        b"NOT HTTP AT ALL\\r\\n\\r\\n",
                        b"\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xfc\\x03\\x03" + bytes(64) + b"\\r\\n\\r\\n",
                        b"GET / HTTP/1.1\\r\\nHost: x\\r\\nX: " + b"a" * 70000 + b"\\r\\n\\r\\n"):
            s = socket.create_connection((host, port), timeout=10)
            try:
                s.sendall(request)
                answers.append(s.recv(200).split(b"\\r\\n", 1)[0].decode(errors="replace"))
            except (BrokenPipeError, ConnectionResetError):
                answers.append("reset")
            s.close()
        print(json.dumps(answers))
    """
    answers = in_pod(pods["attacker"], script, agent.attack_ip, str(agent.flows_port))
    codes = [a.split(" ")[1] if a.startswith("HTTP/") else a for a in answers]
    assert codes[:4] == ["403", "400", "405", "400"], answers
    assert codes[4] in ("400", "reset") and codes[5] in ("431", "reset"), answers
    time.sleep(1.5)
    assert agent.metric("flowtel_component_http_client_errors", "flows") - errors_before >= 4
    assert agent.metric("flowtel_component_http_client_resets", "flows") - resets_before >= 5
    assert agent.proc.poll() is None
    stderr = agent.stderr()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert " ERROR " not in stderr and "Exception" not in stderr, stderr[-3000:]
