"""The web UI in a real headless Chromium, and the pod/namespace/label filters of
`flowtel observe`, against an agent with real traffic between network-namespace pods.

The agent runs in this process so that two test-only components can join the real ones:
a stand-in for the k8sattributes processor that names the testbed's pods (the flows' pod
names, namespaces, labels and workloads come from it), and a receiver that injects one
DROPPED flow between two of the pods, because receiver/ebpf does not report drops yet.
Everything else (the ebpf receiver, the pipeline, the flows and ui extensions, HTTP,
`flowtel observe`) is the real thing. A screenshot of the UI is kept in
$FLOWTEL_TEST_ARTIFACTS (default: test-artifacts/ in the repository).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from flowtel.cli import main
from flowtel.component import ComponentConfig, Consumer, CreateSettings, Factory, Kind, Processor, Receiver
from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.records import Endpoint, Flow, Record, TrafficDirection, Verdict, Workload
from flowtel.registry import factories_by_kind
from flowtel.testbed import Pod, Testbed, send_ping, send_tcp, send_udp

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
# pod name -> (namespace, pod, workload, kind, app label)
PODS = {
    "web": ("shop", "web-5d8f", "web", "Deployment", "web"),
    "api": ("shop", "api-0", "api", "StatefulSet", "api"),
    "db": ("data", "db-7f6c", "db", "Deployment", "db"),
}


class StandInK8sConfig(ComponentConfig):
    endpoints: dict[str, list[str]] = {}  # ip -> [namespace, pod, workload, kind, app]


class StandInK8s(Processor):
    """Fills both ends of each flow from a fixed table, as k8sattributes will from the API."""

    def __init__(self, settings: CreateSettings, config: StandInK8sConfig) -> None:
        super().__init__(settings)
        self.table = {ip: Endpoint(namespace=ns, pod_name=pod, labels=[f"k8s:app={app}"],
                                   workloads=[Workload(workload, kind)])
                      for ip, (ns, pod, workload, kind, app) in config.endpoints.items()}

    def process(self, batch: list[Record]) -> list[Record]:
        for r in batch:
            if isinstance(r, Flow):
                r.source = self.table.get(r.src_ip, r.source)
                r.destination = self.table.get(r.dst_ip, r.destination)
        return batch


class InjectDropConfig(ComponentConfig):
    src_ip: str
    dst_ip: str


class InjectDrop(Receiver):
    def __init__(self, settings: CreateSettings, config: InjectDropConfig, nxt: Consumer) -> None:
        super().__init__(settings, nxt)
        self.config = config

    def start(self) -> None:
        self.next_consumer.consume([Flow(
            time_ns=time.time_ns(), node_name=self.settings.node_name, verdict=Verdict.DROPPED, ip_version=4,
            src_ip=self.config.src_ip, dst_ip=self.config.dst_ip, protocol=6, src_port=40000, dst_port=5432,
            traffic_direction=TrafficDirection.EGRESS, tcp_flags=0x02, packets=1, bytes=74,
            drop_reason="NETFILTER_DROP",
        )])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, service: Service, pods: dict[str, Pod]) -> None:
        self.service = service
        self.pods = pods
        self.flows_server = service.extensions["flows"].endpoint  # type: ignore[attr-defined]
        self.ui = service.extensions["ui"].endpoint  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("ui")
    Testbed.cleanup_stale()
    with Testbed() as bed:
        pods = {name: bed.add_pod(name) for name in PODS}
        bed.start_tcp_sink(pods["api"], 8080)
        bed.start_udp_sink(pods["db"], 9000)
        factories = factories_by_kind()
        factories[Kind.PROCESSOR]["standink8s"] = Factory("standink8s", Kind.PROCESSOR, StandInK8sConfig,
                                                          StandInK8s, ("logs",))
        factories[Kind.RECEIVER]["injectdrop"] = Factory("injectdrop", Kind.RECEIVER, InjectDropConfig,
                                                         InjectDrop, ("logs",))
        config = parse_config({
            "receivers": {
                # Node-wide kernel drops (other tests' traffic) would draw edges this test cannot predict.
                "ebpf": {"interfaces": [bed.interface_glob], "collection_interval": "300ms",
                         "kernel_events": {"drops": {"enabled": False}, "tcp": {"enabled": False}}},
                "injectdrop": {"src_ip": pods["web"].ipv4, "dst_ip": pods["db"].ipv4},
            },
            "processors": {"standink8s": {"endpoints": {pods[n].ipv4: list(v) for n, v in PODS.items()}}},
            "exporters": {"file": {"path": str(tmp / "flows.log")}},
            "extensions": {"flows": {"endpoint": f"127.0.0.1:{free_port()}"},
                           "ui": {"endpoint": f"127.0.0.1:{free_port()}"}},
            "service": {"extensions": ["flows", "ui"], "pipelines": {"logs": {
                "receivers": ["ebpf", "injectdrop"], "processors": ["standink8s"], "exporters": ["file"]}}},
        }, "test_ui_e2e", factories=factories)
        service = Service(config, node_name="test-node", factories=factories)
        service.start()
        try:
            send_tcp(pods["web"], pods["api"].ipv4, 8080, 20_000)
            send_udp(pods["api"], pods["db"].ipv4, 9000, 4, 200)
            assert send_ping(pods["db"], pods["web"].ipv4, 2, interval=0.02).received == 2
            running = Running(service, pods)
            wait_for(lambda: {("shop/web", "shop/api"), ("shop/api", "data/db"), ("data/db", "shop/web")}
                     <= edges(running), "the three edges in the map")
            yield running
        finally:
            service.shutdown()


def edges(agent: Running) -> set[tuple[str, str]]:
    graph = agent.service.extensions["flows"].hub.service_map()  # type: ignore[attr-defined]
    return {(e["client"], e["server"]) for e in graph["edges"]}


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def observe(capsys: pytest.CaptureFixture[str], agent: Running, *argv: str) -> list[dict[str, Any]]:
    code = main(["observe", "--server", agent.flows_server, "--all", "-o", "json", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(line)["flow"] for line in out.splitlines() if line.startswith('{"flow"')]


def end(f: dict[str, Any], side: str) -> tuple[str, str]:
    ep = f.get(side, {})
    return ep.get("namespace", ""), ep.get("pod_name", "")


def app(f: dict[str, Any], side: str) -> str:
    return next((label.split("=", 1)[1] for label in f.get(side, {}).get("labels", ()) if label.startswith("k8s:app=")), "")


POD_CASES: list[tuple[list[str], Callable[[dict[str, Any]], bool]]] = [
    (["--pod", "shop/web"], lambda f: ("shop", "web-5d8f") in (end(f, "source"), end(f, "destination"))),
    (["--pod", "web"], lambda f: False),  # Hubble: a bare pod name is in namespace "default"
    (["--from-pod", "shop/web"], lambda f: end(f, "source") == ("shop", "web-5d8f")),
    (["--to-pod", "data/db"], lambda f: end(f, "destination") == ("data", "db-7f6c")),
    (["--from-pod", "shop/web", "--from-pod", "shop/api"], lambda f: end(f, "source")[0] == "shop"),
    (["--namespace", "data"], lambda f: "data" in (end(f, "source")[0], end(f, "destination")[0])),
    (["--not", "--namespace", "data"], lambda f: "data" not in (end(f, "source")[0], end(f, "destination")[0])),
    (["--label", "app=api"], lambda f: "api" in (app(f, "source"), app(f, "destination"))),
    (["--from-label", "app=web", "--to-port", "8080"],
     lambda f: app(f, "source") == "web" and f["l4"].get("TCP", {}).get("destination_port") == 8080),
    (["--to-label", "app in (db, api)", "--verdict", "DROPPED"],
     lambda f: app(f, "destination") in ("db", "api") and f["verdict"] == "DROPPED"),
]


@pytest.mark.parametrize("argv, expect", POD_CASES, ids=[" ".join(c[0]) for c in POD_CASES])
def test_pod_namespace_and_label_filters(agent: Running, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], expect: Callable[[dict[str, Any]], bool]) -> None:
    everything = observe(capsys, agent)
    expected = [f for f in everything if expect(f)]
    assert len(expected) < len(everything)
    got = observe(capsys, agent, *argv)
    assert got[:len(expected)] == expected
    assert all(expect(f) for f in got)
    if argv != ["--pod", "web"]:
        assert expected, "the case must select some flows"


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
         "--virtual-time-budget=8000", "--window-size=1400,1000", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=90,
    )


def test_ui_draws_workloads_edges_and_the_dropped_flow(agent: Running, tmp_path: Path) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        message = "needs Debian's chromium (scripts/setup.sh installs it)"
        if os.environ.get("FLOWTEL_REQUIRE_KERNEL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    stop = threading.Event()

    def traffic() -> None:  # the page is read while traffic flows
        while not stop.wait(0.3):
            send_udp(agent.pods["api"], agent.pods["db"].ipv4, 9000, 1, 64)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        dom = _chromium("--dump-dom", f"http://{agent.ui}/", profile=tmp_path / "profile-dom").stdout
        # The view a user gets from picking namespace "data" and clicking the dropped edge,
        # opened through the link the page keeps in its URL fragment.
        picked = _chromium("--dump-dom", f"http://{agent.ui}/#namespace=data&edge=shop/web,data/db,DROPPED",
                           profile=tmp_path / "profile-picked").stdout
        artifacts = Path(os.environ.get("FLOWTEL_TEST_ARTIFACTS", REPO / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = artifacts / "ui-service-map.png"
        shot.unlink(missing_ok=True)
        _chromium(f"--screenshot={shot}", f"http://{agent.ui}/", profile=tmp_path / "profile-shot")
    finally:
        stop.set()
        thread.join(5)
        shutil.rmtree(tmp_path / "profile-dom", ignore_errors=True)
        shutil.rmtree(tmp_path / "profile-shot", ignore_errors=True)
        shutil.rmtree(tmp_path / "profile-picked", ignore_errors=True)

    # Workload nodes with their namespaces, drawn from the agent's map.
    for node_id in ("shop/web", "shop/api", "data/db"):
        assert f'class="node kind-workload" data-id="{node_id}"' in dom, node_id
    assert '<text x="10" y="19" class="name">web</text>' in dom
    assert '<text x="10" y="35" class="ns">data</text>' in dom
    # The real edges, solid, and the dropped one red-dashed (class "edge dropped").
    assert 'class="edge" data-client="shop/web" data-server="shop/api" data-verdict="FORWARDED"' in dom
    assert 'class="edge" data-client="shop/api" data-server="data/db" data-verdict="FORWARDED"' in dom
    assert 'class="edge dropped" data-client="shop/web" data-server="data/db" data-verdict="DROPPED"' in dom
    assert "TCP/8080 · " in dom and "TCP/5432 · 1 flows · DROPPED" in dom
    # The flow table lists the pods' flows, the dropped one marked.
    assert '<td>shop/web-5d8f:40000</td><td>data/db-7f6c:5432</td><td>NETFILTER_DROP</td>' in dom
    assert '<tr class="flow dropped">' in dom
    assert "shop/api-0:8080" in dom and "data/db-7f6c:9000" in dom
    assert '<option value="data">data</option><option value="shop">shop</option>' in dom
    # Namespace picker and per-edge details.
    assert '<aside id="details">' in picked and '<h2 id="details-title">shop/web → data/db</h2>' in picked
    assert ('<tr class="dropped"><td>TCP/5432</td><td class="verdict">DROPPED</td><td>1</td><td>74</td><td>1</td>'
            in picked)
    rows = re.findall(r'<tr class="flow[^"]*">(.*?)</tr>', picked)
    assert rows and all("data/db-7f6c" in row for row in rows)
    assert 'data-client="shop/web" data-server="shop/api"' not in picked  # the map shows only namespace data
    # The screenshot is a real rendering of that page, kept for a person to look at.
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
