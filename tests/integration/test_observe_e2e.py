"""`flowtel observe` and `flowtel map` against `flowtel run` with the hubble extension
(gRPC), on the real kernel: three pods, known traffic, every address/port/protocol/type filter checked
against an independent reading of the flows, byte counts against the kernel's counters.

Pod, namespace and label filters need Kubernetes attributes on the flows: test_ui_e2e.py
checks them with the k8sattributes processor's static source.
"""
from __future__ import annotations

from tests.support.flowlog import parse_line

import ipaddress
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from flowtel.cli import main
from flowtel.lib.hubble.convert import flow_json as flow_to_dict
from flowtel.lib.hubble.parse import flow_from_json as flow_from_dict
from testbed import LinkStats, Pod, Testbed, send_ping, send_tcp, send_udp

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
ETH_IP_UDP = 14 + 20 + 8
UDP_COUNT, UDP_SIZE, TCP_BYTES, PINGS = 10, 300, 50_000, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Agent:
    bed: Testbed
    web: Pod
    api: Pod
    db: Pod
    server: str  # the hubble extension (gRPC): what observe and map talk to
    http: str  # the flows extension: the HTTP view of the same store, read here independently
    proc: subprocess.Popen[bytes]
    stderr: Path
    web_before: LinkStats


def _wait(cond: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], stderr: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}: {stderr.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {stderr.read_text()[-3000:]}")
        time.sleep(0.1)


def _healthy(server: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server}/healthz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _attached(ifname: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", ifname, "ingress"], capture_output=True, text=True).stdout
    return " bpf " in out


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    tmp = tmp_path_factory.mktemp("observe")
    Testbed.cleanup_stale()
    with Testbed() as bed:
        web, api, db = (bed.add_pod(n) for n in ("web", "api", "db"))
        bed.start_tcp_sink(api, 8080)
        bed.start_udp_sink(db, 9000)
        http, server = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        config = tmp / "flowtel.yaml"
        config.write_text(f"""
receivers:
  ebpf:
    interfaces: ["{bed.interface_glob}"]
    collection_interval: 500ms
    # Node-wide drops and TCP events (other tests' traffic) would add edges this test
    # cannot predict; receiver/ebpf/kernel_events/test_kernel_events.py covers them.
    kernel_events: {{drops: {{enabled: false}}, tcp: {{enabled: false}}}}
exporters:
  file:
    path: {tmp / "flows.log"}
extensions:
  flows:
    endpoint: "{http}"
  hubble:
    endpoint: "{server}"
service:
  extensions: [flows, hubble]
  pipelines:
    logs:
      receivers: [ebpf]
      exporters: [file]
""")
        stderr = tmp / "agent.stderr"
        proc = subprocess.Popen([sys.executable, "-m", "flowtel.cli", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=stderr.open("w"), cwd=REPO,
                                env={**os.environ, "NODE_NAME": "test-node"})
        try:
            _wait(lambda: _healthy(http), "the flow API", proc, stderr)
            _wait(lambda: all(_attached(p.host_ifname) for p in (web, api, db)), "tc attach", proc, stderr)
            web_before = bed.link_stats(web)
            send_tcp(web, api.ipv4, 8080, TCP_BYTES)
            send_udp(web, db.ipv4, 9000, UDP_COUNT, UDP_SIZE, interval=0.002)
            assert send_ping(api, db.ipv4, PINGS, interval=0.02).received == PINGS
            yield Agent(bed, web, api, db, server, http, proc, stderr, web_before)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(30) == 0, stderr.read_text()
            finally:
                if proc.poll() is None:
                    proc.kill()


def observe(capsys: pytest.CaptureFixture[str], agent: Agent, *argv: str) -> list[dict[str, Any]]:
    code = main(["observe", "--server", agent.server, "--all", "-o", "json", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [parse_line(line)["flow"] for line in out.splitlines() if line.startswith('{"flow"')]


def packets(flows: list[dict[str, Any]]) -> int:
    return sum(f["extensions"]["packets"] for f in flows)


@pytest.fixture(scope="module")
def everything(agent: Agent) -> list[dict[str, Any]]:
    """Every flow in the agent's ring once all the traffic has been drained into it."""
    def complete() -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://{agent.http}/flows", timeout=5) as resp:
            # The HTTP flow API's lines, parsed strictly too.
            return [parse_line(line)["flow"] for line in resp.read().decode().splitlines() if '"flow"' in line]

    def done() -> bool:
        flows = complete()
        udp = [f for f in flows if f.get("l4", {}).get("UDP", {}).get("destination_port") == 9000]
        icmp = [f for f in flows if "ICMPv4" in f.get("l4", {})]
        # Each datagram and echo is counted on both veths it crosses.
        return packets(udp) == 2 * UDP_COUNT and packets(icmp) == 4 * PINGS

    _wait(done, "all test traffic in the ring", agent.proc, agent.stderr, timeout=20)
    time.sleep(1.2)  # two more drains: the last TCP segments (FIN/ACK) settle
    return complete()


def ip(f: dict[str, Any], end: str) -> str:
    return f.get("IP", {}).get(end, "")


def port(f: dict[str, Any], end: str) -> int | None:
    l4 = f.get("l4", {})
    body = l4.get("TCP") or l4.get("UDP")
    return None if body is None else body.get(f"{end}_port", 0)


def proto(f: dict[str, Any]) -> str:
    return next(iter(f.get("l4", {"none": 0})))


CASES: list[tuple[list[str], Callable[[dict[str, Any], Agent], bool]]] = [
    (["--ip", "{web}"], lambda f, a: a.web.ipv4 in (ip(f, "source"), ip(f, "destination"))),
    (["--from-ip", "{web}"], lambda f, a: ip(f, "source") == a.web.ipv4),
    (["--to-ip", "{db}"], lambda f, a: ip(f, "destination") == a.db.ipv4),
    (["--from-ip", "{web}", "--from-ip", "{api}"], lambda f, a: ip(f, "source") in (a.web.ipv4, a.api.ipv4)),
    (["--ip", "{db}/32"], lambda f, a: a.db.ipv4 in (ip(f, "source"), ip(f, "destination"))),
    (["--port", "8080"], lambda f, a: 8080 in (port(f, "source"), port(f, "destination"))),
    (["--from-port", "8080"], lambda f, a: port(f, "source") == 8080),
    (["--to-port", "9000"], lambda f, a: port(f, "destination") == 9000),
    (["--protocol", "tcp"], lambda f, a: proto(f) == "TCP"),
    (["--protocol", "udp", "--protocol", "icmp"], lambda f, a: proto(f) in ("UDP", "ICMPv4")),
    (["--from-ip", "{web}", "--protocol", "udp"], lambda f, a: ip(f, "source") == a.web.ipv4 and proto(f) == "UDP"),
    (["--not", "--protocol", "tcp"], lambda f, a: proto(f) != "TCP"),
    (["--to-ip", "{api}", "--not", "--from-port", "8080"],
     lambda f, a: ip(f, "destination") == a.api.ipv4 and port(f, "source") != 8080),
    (["--type", "trace:from-endpoint"], lambda f, a: f["traffic_direction"] == "EGRESS"),
    (["--type", "trace:to-endpoint"], lambda f, a: f["traffic_direction"] == "INGRESS"),
    (["--verdict", "FORWARDED", "--protocol", "icmp"], lambda f, a: proto(f) == "ICMPv4"),
]


@pytest.mark.parametrize("argv, expect", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_each_filter_selects_exactly_the_expected_flows(
    agent: Agent, everything: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
    argv: list[str], expect: Callable[[dict[str, Any], Agent], bool],
) -> None:
    args = [a.format(web=agent.web.ipv4, api=agent.api.ipv4, db=agent.db.ipv4) for a in argv]
    ours = [f for f in everything if ip(f, "source") in _pod_ips(agent) or ip(f, "destination") in _pod_ips(agent)]
    expected = [f for f in ours if expect(f, agent)]
    assert expected and len(expected) < len(ours), "the case must select some flows but not all"
    got = observe(capsys, agent, *args)
    # The ring only grows, so the answer starts with exactly what the filter picks from
    # the snapshot taken before (the newest flows may have arrived since).
    assert got[:len(expected)] == expected
    assert all(expect(f, agent) for f in got)


def _pod_ips(agent: Agent) -> set[str]:
    return {agent.web.ipv4, agent.api.ipv4, agent.db.ipv4}


def test_udp_filter_counts_equal_what_was_sent(agent: Agent, everything: list[dict[str, Any]],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    got = observe(capsys, agent, "--from-ip", agent.web.ipv4, "--to-ip", agent.db.ipv4, "--protocol", "udp")
    by_direction = {d: [f for f in got if f["traffic_direction"] == d] for d in ("EGRESS", "INGRESS")}
    # Sent out of web's veth (EGRESS) and delivered into db's (INGRESS): each datagram once per side.
    assert packets(by_direction["EGRESS"]) == UDP_COUNT
    assert packets(by_direction["INGRESS"]) == UDP_COUNT
    assert sum(f["extensions"]["bytes"] for f in got) == 2 * UDP_COUNT * (ETH_IP_UDP + UDP_SIZE)
    assert {f["interface"]["name"] for f in by_direction["EGRESS"]} == {agent.web.host_ifname}


def test_drop_and_l7_types_select_nothing_when_there_is_none(agent: Agent, everything: list[dict[str, Any]],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert observe(capsys, agent, "--verdict", "DROPPED") == []
    assert observe(capsys, agent, "--type", "drop") == []


def test_json_lines_are_hubble_flows(agent: Agent, everything: list[dict[str, Any]],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["observe", "--server", agent.server, "--last", "5", "-o", "json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert main(["observe", "--server", agent.server, "--all", "-o", "json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= len(everything) > 5
    for line in lines:
        parse_line(line)  # strictly Cilium's GetFlowsResponse: no unknown fields, valid enums
        env = json.loads(line)
        assert set(env) == {"flow", "node_name", "time"}
        flow = env["flow"]
        assert env["node_name"] == flow["node_name"] == "test-node" and env["time"] == flow["time"]
        assert {"time", "verdict", "Type", "event_type", "Summary"} <= set(flow)
        if "IP" in flow:
            ipaddress.ip_address(flow["IP"]["source"])
            assert flow["traffic_direction"] in ("INGRESS", "EGRESS")
        assert flow_to_dict(flow_from_dict(flow)) == flow


def test_follow_receives_flows_that_arrive_after_it_started(agent: Agent, everything: list[dict[str, Any]],
                                                            tmp_path: Path) -> None:
    err = tmp_path / "observe.err"
    # --since a moment ago: the stream starts with what arrived since then, so the traffic
    # below is seen however long the client takes to connect on a loaded machine.
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowtel.cli", "observe", "--server", agent.server, "--follow", "-o", "json",
         "--since", since, "--from-ip", agent.api.ipv4, "--protocol", "udp"],
        stdout=subprocess.PIPE, stderr=err.open("w"), text=True, cwd=REPO,
    )
    try:
        time.sleep(1.0)
        assert proc.poll() is None, err.read_text()
        sent = send_udp(agent.api, agent.db.ipv4, 9000, 5, 100)
        seen = 0
        assert proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()  # a reader thread: readline never blocks the deadline
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while seen < 10 and time.monotonic() < deadline:
            try:
                flow = parse_line(lines.get(timeout=1.0))["flow"]
            except queue.Empty:
                continue
            if flow["l4"]["UDP"]["source_port"] != sent.src_port:
                continue  # earlier datagrams of this module (since is a second back)
            assert flow["IP"]["source"] == agent.api.ipv4
            seen += flow["extensions"]["packets"]
        assert seen == 10, err.read_text()  # 5 datagrams, each on api's and db's veth
    finally:
        proc.terminate()
        proc.wait(10)


def test_map_edges_and_bytes_match_the_kernel(agent: Agent, everything: list[dict[str, Any]],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    web, api, db = agent.web.ipv4, agent.api.ipv4, agent.db.ipv4
    d = agent.bed.link_stats(agent.web) - agent.web_before
    # web's veth carried only the TCP exchange with api and the UDP datagrams to db.
    tcp_truth = d.rx_bytes - UDP_COUNT * (ETH_IP_UDP + UDP_SIZE) + d.tx_bytes

    def edges() -> dict[tuple[str, str, str, str], dict[str, Any]]:
        assert main(["map", "--server", agent.server, "-o", "json"]) == 0
        graph = json.loads(capsys.readouterr().out)
        return {(e["client"], e["server"], e["protocol"], e["port"]): e for e in graph["edges"]}

    deadline = time.monotonic() + 10
    while edges()[(web, api, "TCP", "8080")]["bytes"] != tcp_truth and time.monotonic() < deadline:
        time.sleep(0.5)
    got = edges()
    assert got[(web, api, "TCP", "8080")]["bytes"] == tcp_truth
    assert got[(web, db, "UDP", "9000")]["bytes"] == UDP_COUNT * (ETH_IP_UDP + UDP_SIZE)
    assert got[(api, db, "ICMPv4", "")]["packets"] == 2 * PINGS
    assert all(e["verdict"] == "FORWARDED" for e in got.values())

    assert main(["map", "--server", agent.server, "-o", "dot"]) == 0
    dot = capsys.readouterr().out
    assert f'"{web}" -> "{api}" [label="TCP/8080 FORWARDED: ' in dot
    assert main(["map", "--server", agent.server, "-o", "mermaid"]) == 0
    assert capsys.readouterr().out.startswith("flowchart LR\n")
