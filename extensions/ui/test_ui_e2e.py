"""The web UI in a real headless Chromium, and the pod/namespace/label filters of
`flowtel observe`, against `flowtel run` with real traffic between network-namespace pods.

Everything is the real thing: the ebpf receiver (tc on the pods' veths, and skb:kfree_skb
for drops), the k8sattributes processor with its static source (a file naming the testbed's
pods, namespaces, labels and workloads, as the API would), the pipeline, the flows and ui
extensions, HTTP, and `flowtel observe`. The dropped traffic is a real kernel drop: an
nftables rule in the db pod's namespace drops TCP to port 5432, and its own counter is the
truth for the number of dropped packets and bytes the UI must show.

Kernel drop events are node-wide, and other tests on this machine cause drops at the same
time; every assertion therefore looks only at the testbed's own pods (their workload names,
or `--ip` with the testbed's /24), never assumes the only drops are ours. A screenshot of
the UI is kept in $FLOWTEL_TEST_ARTIFACTS (default: test-artifacts/ in the repository).
"""
from __future__ import annotations

from tests.support.flowlog import parse_line

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from flowtel.cli import main
from flowtel.lib.hubble.client import Connection, ObserverClient
from testbed import Pod, Testbed, send_ping, send_tcp, send_udp
from tests.support.chromium_cdp import Browser

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
# testbed pod -> (namespace, pod name, workload, kind, app label), as the static file says
PODS = {
    "web": ("shop", "web-5d8f", "web", "Deployment", "web"),
    "api": ("shop", "api-0", "api", "StatefulSet", "api"),
    "db": ("data", "db-7f6c", "db", "Deployment", "db"),
}
DROPPED_PORT = 5432
DROP_ATTEMPTS = 3
NFT_TABLE = "flowtel_ui_test"

# One SYN per attempt: the socket gives up (0.3 s) before the kernel's first SYN
# retransmission (1 s initial RTO), so the drops are exactly the attempts.
_CONNECT_DROPPED = r"""
import socket, sys
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    s = socket.socket()
    s.settimeout(0.3)
    try:
        s.connect((dst, port))
        raise SystemExit("connected through a dropping rule?")
    except socket.timeout:
        pass
    s.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Agent:
    pods: dict[str, Pod]
    network: str  # the testbed's /24: every flow of its pods has an address in it
    flows_server: str
    ui: str
    proc: subprocess.Popen[bytes]
    stderr: Path
    dropped_packets: int  # nftables' counter of the dropping rule: the kernel's truth
    dropped_bytes: int


def _wait(cond: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], stderr: Path,
          timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}: {stderr.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {stderr.read_text()[-3000:]}")
        time.sleep(0.1)


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.read()
    except OSError:
        return None


def _attached(ifname: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", ifname, "ingress"], capture_output=True, text=True).stdout
    return " bpf " in out


def _static_metadata(pods: dict[str, Pod]) -> dict[str, Any]:
    return {"pods": [{"name": pod, "namespace": ns, "ips": [pods[name].ipv4], "labels": {"app": app},
                      "workloads": [{"kind": kind, "name": workload}], "node": "test-node"}
                     for name, (ns, pod, workload, kind, app) in PODS.items()]}


def _nft_drop_with_counter(pod: Pod) -> None:
    pod.exec(["nft", "-f", "-"], input=f"""table inet {NFT_TABLE} {{
    chain input {{
        type filter hook input priority 0;
        tcp dport {DROPPED_PORT} counter drop
    }}
}}
""")


def _nft_counter(pod: Pod) -> tuple[int, int]:
    """(packets, bytes) the dropping rule's counter holds."""
    ruleset = json.loads(pod.exec(["nft", "-j", "list", "table", "inet", NFT_TABLE]).stdout)["nftables"]
    (counter,) = [e["counter"] for item in ruleset if "rule" in item for e in item["rule"]["expr"] if "counter" in e]
    return counter["packets"], counter["bytes"]


def service_map(ui: str, namespace: str = "") -> dict[str, Any]:
    data = _get(f"http://{ui}/api/map" + (f"?namespace={namespace}" if namespace else ""))
    return json.loads(data) if data else {"nodes": [], "edges": []}


def edge(graph: dict[str, Any], client: str, server: str, verdict: str, port: str) -> dict[str, Any] | None:
    return next((e for e in graph["edges"] if (e["client"], e["server"], e["verdict"], e["port"]) ==
                 (client, server, verdict, port)), None)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    tmp = tmp_path_factory.mktemp("ui")
    Testbed.cleanup_stale()
    with Testbed() as bed:
        pods = {name: bed.add_pod(name) for name in PODS}
        bed.start_tcp_sink(pods["api"], 8080)
        bed.start_udp_sink(pods["db"], 9000)
        _nft_drop_with_counter(pods["db"])
        metadata = tmp / "k8s-metadata.yaml"
        metadata.write_text(yaml.safe_dump(_static_metadata(pods)))
        flows_server, ui, health = (f"127.0.0.1:{free_port()}" for _ in range(3))
        # `flowtel observe` talks to the hubble extension (gRPC); the ui serves the same store's view.
        # A large ring: node-wide drops from other tests must not push this test's flows out.
        config = tmp / "flowtel.yaml"
        config.write_text(yaml.safe_dump({
            # Drops are aggregated in the kernel and drained on the kernel events' own
            # collection interval (10 s by default): that of the flows here too, so that the
            # kernel's drops reach the rings well within the waits below at any load.
            "receivers": {"ebpf": {"interfaces": [bed.interface_glob], "collection_interval": "300ms",
                                   "kernel_events": {"collection_interval": "300ms", "poll_interval": "100ms"}}},
            "processors": {"k8sattributes": {"source": "static", "static": {"path": str(metadata)}}},
            "exporters": {"file": {"path": str(tmp / "flows.log")}},
            "extensions": {"hubble": {"endpoint": flows_server, "buffer_size": 50_000},
                           "ui": {"endpoint": ui, "buffer_size": 50_000},
                           "health_check": {"endpoint": health}},
            "service": {"extensions": ["health_check", "hubble", "ui"], "pipelines": {"logs": {
                "receivers": ["ebpf"], "processors": ["k8sattributes"], "exporters": ["file"]}}},
        }))
        stderr = tmp / "agent.stderr"
        proc = subprocess.Popen([sys.executable, "-m", "flowtel.cli", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=stderr.open("w"), cwd=REPO,
                                env={**os.environ, "NODE_NAME": "test-node"})
        try:
            # Ready: every receiver started, so the kernel-event tracepoints are attached too.
            _wait(lambda: _get(f"http://{health}/") is not None, "the agent to be ready", proc, stderr)
            _wait(lambda: all(_attached(p.host_ifname) for p in pods.values()), "tc attach", proc, stderr)
            send_tcp(pods["web"], pods["api"].ipv4, 8080, 20_000)
            send_udp(pods["api"], pods["db"].ipv4, 9000, 4, 200)
            assert send_ping(pods["db"], pods["web"].ipv4, 2, interval=0.02).received == 2
            pods["web"].exec([sys.executable, "-c", _CONNECT_DROPPED, pods["db"].ipv4, str(DROPPED_PORT),
                              str(DROP_ATTEMPTS)])
            packets, nbytes = _nft_counter(pods["db"])
            assert packets == DROP_ATTEMPTS, "each attempt is one dropped SYN"

            def complete() -> bool:
                graph = service_map(ui)
                drop = edge(graph, "shop/web", "data/db", "DROPPED", str(DROPPED_PORT))
                return (drop is not None and drop["dropped"] >= packets
                        and all(edge(graph, c, s, "FORWARDED", p) for c, s, p in
                                (("shop/web", "shop/api", "8080"), ("shop/api", "data/db", "9000"),
                                 ("data/db", "shop/web", ""))))

            _wait(complete, "the pods' edges and the kernel's drops in the map", proc, stderr, timeout=20)
            yield Agent(pods, str(bed.ipv4_network), flows_server, ui, proc, stderr, packets, nbytes)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(30) == 0, stderr.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()


def test_the_map_counts_the_kernels_drops_exactly(agent: Agent) -> None:
    """The dropped edge, from skb:kfree_skb events named by k8sattributes, equals nft's counter."""
    time.sleep(0.5)  # a later drop (there must be none) would have been drained by now (300 ms interval)
    drop = edge(service_map(agent.ui), "shop/web", "data/db", "DROPPED", str(DROPPED_PORT))
    assert drop is not None
    assert (drop["flows"], drop["packets"], drop["dropped"], drop["bytes"]) == (
        agent.dropped_packets, agent.dropped_packets, agent.dropped_packets, agent.dropped_bytes)
    assert (drop["client_namespace"], drop["server_namespace"], drop["protocol"]) == ("shop", "data", "TCP")


def observe(capsys: pytest.CaptureFixture[str], agent: Agent, *argv: str) -> list[dict[str, Any]]:
    """The flows `flowtel observe` prints that involve the testbed's pods: the ring also holds
    other tests' node-wide drops (and `--ip` cannot be combined with `--pod`, as in Hubble)."""
    code = main(["observe", "--server", agent.flows_server, "--all", "-o", "json", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    network = ipaddress.ip_network(agent.network)
    flows = [parse_line(line)["flow"] for line in out.splitlines() if line.startswith('{"flow"')]
    return [f for f in flows
            if any(ipaddress.ip_address(f.get("IP", {}).get(end, "0.0.0.0")) in network for end in ("source", "destination"))]


def end(f: dict[str, Any], side: str) -> tuple[str, str]:
    ep = f.get(side, {})
    return ep.get("namespace", ""), ep.get("pod_name", "")


def app(f: dict[str, Any], side: str) -> str:
    return next((label.split("=", 1)[1] for label in f.get(side, {}).get("labels", ()) if label.startswith("k8s:app=")), "")


def dst_port(f: dict[str, Any]) -> int | None:
    return f.get("l4", {}).get("TCP", {}).get("destination_port")


POD_CASES: list[tuple[list[str], Callable[[dict[str, Any]], bool]]] = [
    (["--pod", "shop/web"], lambda f: ("shop", "web-5d8f") in (end(f, "source"), end(f, "destination"))),
    (["--pod", "web"], lambda f: False),  # Hubble: a bare pod name is in namespace "default"
    (["--from-pod", "shop/web"], lambda f: end(f, "source") == ("shop", "web-5d8f")),
    (["--to-pod", "data/db"], lambda f: end(f, "destination") == ("data", "db-7f6c")),
    (["--from-pod", "shop/web", "--from-pod", "shop/api"], lambda f: end(f, "source")[0] == "shop"),
    (["--namespace", "data"], lambda f: "data" in (end(f, "source")[0], end(f, "destination")[0])),
    (["--not", "--namespace", "data"], lambda f: "data" not in (end(f, "source")[0], end(f, "destination")[0])),
    (["--label", "app=api"], lambda f: "api" in (app(f, "source"), app(f, "destination"))),
    (["--from-label", "app=web", "--to-port", "8080"], lambda f: app(f, "source") == "web" and dst_port(f) == 8080),
    (["--to-label", "app in (db, api)", "--verdict", "DROPPED"],
     lambda f: app(f, "destination") in ("db", "api") and f["verdict"] == "DROPPED"),
]


def ring_counts(agent: Agent) -> tuple[int, int]:
    """(flows in the ring, flows ever added) of the agent's Hubble ring."""
    with ObserverClient(Connection(agent.flows_server)) as client:
        status = client.server_status()
    return status.num_flows, status.seen_flows


def observe_twice(capsys: pytest.CaptureFixture[str], agent: Agent, argv: list[str],
                  timeout: float = 60) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every flow of the testbed's pods, then those the filter ``argv`` selects, from a ring
    that evicted nothing in between.

    The ring is node-wide: other tests' drops enter it too, each kernel drain up to a drop
    map's 16k distinct flows at once, and once it is full every arrival evicts the oldest
    flow, i.e. this module's own first. An eviction between the two reads removes the head
    of what the filter should answer, and the comparison would fail with the filter right.
    So the pair is read again until the ring's counters show that it only grew meanwhile
    (flows ever added grew by exactly as much as flows held)."""
    deadline = time.monotonic() + timeout
    while True:
        held, added = ring_counts(agent)
        everything = observe(capsys, agent)
        got = observe(capsys, agent, *argv)
        held_after, added_after = ring_counts(agent)
        if added_after - added == held_after - held:
            return everything, got
        assert time.monotonic() < deadline, "the ring evicted flows during every pair of reads"


@pytest.mark.parametrize("argv, expect", POD_CASES, ids=[" ".join(c[0]) for c in POD_CASES])
def test_pod_namespace_and_label_filters(agent: Agent, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], expect: Callable[[dict[str, Any]], bool]) -> None:
    everything, got = observe_twice(capsys, agent, argv)
    expected = [f for f in everything if expect(f)]
    assert len(expected) < len(everything)
    # The ring only grew between the reads, so the answer starts with what the filter picks
    # from the first (and what arrived since, if anything, follows it).
    assert got[:len(expected)] == expected
    assert all(expect(f) for f in got)
    if argv != ["--pod", "web"]:
        assert expected, "the case must select some flows"


def test_drops_reach_observe_as_hubble_drop_flows(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    drops = observe(capsys, agent, "--verdict", "DROPPED")
    # Other drops between the pods are real too (the kernel frees ICMP echo replies that
    # no ping socket takes with NO_SOCKET); the rule's drops are exactly nftables' count.
    # NETFILTER_DROP is not a Cilium DropReason: DROP_REASON_UNKNOWN (omitted) on the wire,
    # the kernel's exact reason in extensions. Drops are aggregated in the kernel per drop flow
    # and interval: a record may hold several.
    filtered = [f for f in drops if f["extensions"]["drop_reason"] == "NETFILTER_DROP"]
    assert all("drop_reason_desc" not in f and f["event_type"]["sub_type"] != 0 for f in filtered)
    assert sum(f["extensions"]["packets"] for f in filtered) == agent.dropped_packets
    for f in filtered:
        assert (end(f, "source"), end(f, "destination"), dst_port(f)) == (
            ("shop", "web-5d8f"), ("data", "db-7f6c"), DROPPED_PORT)
        assert f["l4"]["TCP"]["flags"] == {"SYN": True} and f["extensions"]["drop_direction"] == "ingress"
        assert f["destination"]["workloads"] == [{"name": "db", "kind": "Deployment"}]
    assert sum(f["extensions"]["bytes"] for f in filtered) == agent.dropped_bytes
    for f in drops:  # every drop between the pods names both ends and the kernel's reason
        assert f["extensions"]["drop_reason"] and end(f, "source")[1] and end(f, "destination")[1]


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
         "--virtual-time-budget=8000", "--window-size=1400,1000", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=90,
    )


def _open_and_apply(url: str, profile: Path, *, offered: str, shown: str) -> str:
    """Open a link in Chromium, check that its namespace/filter is offered but not run, click
    Apply as a user would, and return the page once it shows the applied view."""
    browser = Browser(CHROMIUM, profile, url)
    try:
        browser.wait_for("document.getElementById('status').textContent.startsWith('updated')")
        banner = browser.evaluate("[document.getElementById('pending').hidden,"
                                  " document.getElementById('pending-text').textContent,"
                                  " document.getElementById('flow-count').textContent]")
        assert banner[0] is False and banner[1] == offered, banner
        assert shown not in banner[2], f"the link's view ran before any click: {banner}"
        browser.click("pending-apply")
        browser.wait_for(f"document.getElementById('flow-count').textContent.includes({json.dumps(shown)})")
        # One more refresh of the applied view (the map's details follow it): the page sets its
        # status only at the end of a refresh, so a mark put there now is gone when one ended.
        browser.evaluate("document.getElementById('status').textContent = 'awaiting a refresh'")
        browser.wait_for("document.getElementById('status').textContent.startsWith('updated')")
        browser.wait_for(f"document.getElementById('flow-count').textContent.includes({json.dumps(shown)})")
        return browser.dom()
    finally:
        browser.close()


def test_ui_draws_workloads_edges_and_the_dropped_flow(agent: Agent, tmp_path: Path) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        message = "needs Debian's chromium (scripts/setup.sh installs it)"
        if os.environ.get("FLOWTEL_REQUIRE_KERNEL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    stop = threading.Event()

    def traffic() -> None:  # the page is read while traffic flows (slowly: the table shows the newest 200)
        while not stop.wait(1.0):
            send_udp(agent.pods["api"], agent.pods["db"].ipv4, 9000, 1, 64)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    ours = f"--ip {agent.network}"
    try:
        # The whole map; the flow table filtered (the filter box, kept in the URL fragment)
        # to the testbed's pods, because other tests' drops are in the node's newest flows.
        # A filter from a link is only offered until the user applies it (a click).
        dom = _open_and_apply(f"http://{agent.ui}/#filter={urllib.parse.quote(ours)}", tmp_path / "profile-dom",
                              offered=f"filter {ours}", shown=f"filter {ours}")
        # The view a user gets from picking namespace "data" and clicking the dropped edge,
        # opened through the link the page keeps in its URL fragment.
        picked = _open_and_apply(f"http://{agent.ui}/#namespace=data&edge=shop/web,data/db,DROPPED",
                                 tmp_path / "profile-picked", offered="namespace data", shown="namespace data")
        artifacts = Path(os.environ.get("FLOWTEL_TEST_ARTIFACTS", REPO / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = artifacts / "ui-service-map.png"
        shot.unlink(missing_ok=True)
        _chromium(f"--screenshot={shot}", f"http://{agent.ui}/#namespace=shop&edge=shop/web,data/db,DROPPED",
                  profile=tmp_path / "profile-shot")
    finally:
        stop.set()
        thread.join(5)
        for profile in ("profile-dom", "profile-shot", "profile-picked"):
            shutil.rmtree(tmp_path / profile, ignore_errors=True)

    n, nbytes = agent.dropped_packets, agent.dropped_bytes
    # Workload nodes with their namespaces, named by k8sattributes from the static file.
    for node_id in ("shop/web", "shop/api", "data/db"):
        assert f'class="node kind-workload" data-id="{node_id}"' in dom, node_id
    assert '<text x="10" y="19" class="name">web</text>' in dom
    assert '<text x="10" y="35" class="ns">data</text>' in dom
    # The real edges, solid, and the kernel's drops as a red-dashed edge ("edge dropped")
    # with exactly the drops nftables counted.
    assert 'class="edge" data-client="shop/web" data-server="shop/api" data-verdict="FORWARDED"' in dom
    assert 'class="edge" data-client="shop/api" data-server="data/db" data-verdict="FORWARDED"' in dom
    assert 'class="edge dropped" data-client="shop/web" data-server="data/db" data-verdict="DROPPED"' in dom
    assert "TCP/8080 · " in dom and f"TCP/{DROPPED_PORT} · {n} flows · DROPPED" in dom
    # The flow table lists the pods' flows, each kernel drop marked, with the kernel's reason.
    drop_rows = re.findall(r'<tr class="flow dropped"><td>[^<]*</td><td>shop/web-5d8f:\d+</td>'
                           rf'<td>data/db-7f6c:{DROPPED_PORT}</td><td>NETFILTER_DROP</td>'
                           r'<td class="verdict">DROPPED</td>', dom)
    assert len(drop_rows) == n
    assert "shop/api-0:8080" in dom and "data/db-7f6c:9000" in dom
    assert '<option value="data">data</option><option value="shop">shop</option>' in dom
    # Namespace picker and per-edge details: the dropped edge's numbers are nftables'.
    assert '<aside id="details">' in picked and '<h2 id="details-title">shop/web → data/db</h2>' in picked
    assert (f'<tr class="dropped"><td>TCP/{DROPPED_PORT}</td><td class="verdict">DROPPED</td><td>{n}</td>'
            f'<td>{nbytes}</td><td>{n}</td>') in picked
    rows = re.findall(r'<tr class="flow[^"]*">(.*?)</tr>', picked)
    assert rows and all("data/db-7f6c" in row for row in rows)
    assert 'data-client="shop/web" data-server="shop/api"' not in picked  # the map shows only namespace data
    # The screenshot is a real rendering of the page, kept for a person to look at.
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
