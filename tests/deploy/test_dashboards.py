"""The Grafana dashboards and the Azure Monitor workbook: their formats, the metric names they
use, every PromQL expression parsed by a real Prometheus server, and every expression
evaluated against a running agent scraped by that server while network-namespace pods
make traffic (DNS with errors, TCP, resets, drops, retransmissions, lost events)."""
from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.deploy.manifests import DEPLOY, REPO

DASHBOARDS = sorted((DEPLOY / "dashboards").glob("*.json"))
WORKBOOK = DEPLOY / "azure" / "workbook.json"
PROMETHEUS = "/usr/bin/prometheus"
METRIC_RE = re.compile(r"\b((?:networkobservability|hubble|flowtel)_[a-z0-9_]+)\b")

# The names the dashboards may use. Node level and pod level: DESIGN.md section 4 and
# /work/shared/reference/metric-compat.md (ACNS/Retina and Hubble). flowtel's own: the
# components that define them (the import fails if one is renamed).
DESIGN_NAMES = {
    "networkobservability_forward_count", "networkobservability_forward_bytes",
    "networkobservability_drop_count", "networkobservability_drop_bytes", "networkobservability_tcp_state",
    "networkobservability_tcp_connection_stats", "networkobservability_ip_connection_stats",
    "networkobservability_udp_connection_stats", "networkobservability_interface_stats",
    "networkobservability_dns_request_count", "networkobservability_dns_response_count",
    "networkobservability_tcp_retransmission_count",
    "hubble_flows_processed_total", "hubble_drop_total", "hubble_tcp_flags_total", "hubble_dns_queries_total",
    "hubble_dns_responses_total", "hubble_dns_response_types_total", "hubble_lost_events_total",
}


def flowtel_names() -> set[str]:
    from connectors.servicegraph.connector import FAMILIES, PREFIX
    from receiver.ebpf.dns import METRIC_UNANSWERED

    return {PREFIX + suffix for suffix in FAMILIES} | {METRIC_UNANSWERED}


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("flowtel_dashboards_generate", DEPLOY / "dashboards" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --- what the files hold ------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    id: str
    text: str  # with the variables as written in the file
    filled: str  # variables replaced by values a Prometheus accepts
    evaluate: bool  # False for variable queries (label_values), which Grafana evaluates itself


GRAFANA_VALUES = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m"}


def fill_grafana(expr: str) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return GRAFANA_VALUES.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


def fill_workbook(expr: str) -> str:
    # {name} and {name:format}, the workbook's parameter syntax; PromQL braces hold '=' and quotes.
    return re.sub(r"\{([A-Za-z_]\w*)(?::[^}]*)?\}", ".*", expr)


def label_values_selector(query: str) -> str:
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert m, f"not a label_values(selector, label) query: {query}"
    return m.group(1)


def grafana_exprs(path: Path) -> Iterator[Expr]:
    d = json.loads(path.read_text())
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            sel = label_values_selector(v["query"])
            yield Expr(f"{d['uid']}:var:{v['name']}", sel, fill_grafana(sel), False)
    for p in d["panels"]:
        for t in p.get("targets", []):
            yield Expr(f"{d['uid']}:{p['id']}:{t['refId']}", t["expr"], fill_grafana(t["expr"]), True)


def workbook_exprs() -> Iterator[Expr]:
    wb = json.loads(WORKBOOK.read_text())
    for item in wb["items"]:
        content = item.get("content", {})
        if item["type"] == 3 and content.get("queryType") == 16:
            text = json.loads(content["query"])["queryText"]
            yield Expr(f"workbook:{item['name']}", text, fill_workbook(text), True)


def all_exprs() -> list[Expr]:
    out = [e for path in DASHBOARDS for e in grafana_exprs(path)]
    return out + list(workbook_exprs())


# --- formats ----------------------------------------------------------------------------------


def test_files_are_what_the_generator_writes() -> None:
    assert load_generator().main(["--check"]) == 0, "run: python deploy/dashboards/generate.py"


def test_the_acns_views_and_the_service_map_are_there() -> None:
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert titles == {
        "flowtel / Networking / Clusters", "flowtel / Networking / DNS (Cluster)",
        "flowtel / Networking / DNS (Workload)", "flowtel / Networking / Drops (Workload)",
        "flowtel / Networking / Pod Flows (Namespace)", "flowtel / Networking / Pod Flows (Workload)",
        "flowtel / Networking / Service Map",
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_grafana_dashboard_format(path: Path) -> None:
    d = json.loads(path.read_text())
    assert {"uid", "title", "panels", "templating", "schemaVersion", "time"} <= set(d)
    assert path.name == f"{d['uid']}.json"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for p in d["panels"]:
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
        if p["type"] in ("row", "text"):
            assert "targets" not in p
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
            used |= set(re.findall(r"\$(\w+)", t["expr"]))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            used |= set(re.findall(r"\$(\w+)", v["query"]))
            assert v["allValue"] == ".*" and v["includeAll"]
    builtins = {"__rate_interval", "__interval", "__range"}
    assert used - builtins <= set(variables), f"undefined variables: {used - builtins - set(variables)}"


def test_workbook_format() -> None:
    wb = json.loads(WORKBOOK.read_text())
    assert wb["version"] == "Notebook/1.0" and isinstance(wb["items"], list) and wb["items"]
    params = [p for item in wb["items"] if item["type"] == 9 for p in item["content"]["parameters"]]
    names = {p["name"] for p in params}
    assert {"cluster", "namespace", "workload", "TimeRange", "MonitorWorkspace", "LogWorkspace"} <= names
    kinds = {"promql": 0, "kql": 0}
    for item in wb["items"]:
        assert item["type"] in (1, 3, 9) and item["name"]
        if item["type"] != 3:
            continue
        c = item["content"]
        assert c["version"] == "KqlItem/1.0" and c["timeContextFromParameter"] == "TimeRange"
        if c["queryType"] == 16:
            kinds["promql"] += 1
            assert c["resourceType"] == "microsoft.monitor/accounts"
            assert c["crossComponentResources"] == ["{MonitorWorkspace}"]
            provider = json.loads(c["query"])
            assert provider["version"] == "PrometheusQueryProvider/1.0" and provider["queryText"]
            text = provider["queryText"]
        else:
            assert c["queryType"] == 0 and c["resourceType"] == "microsoft.operationalinsights/workspaces"
            assert c["crossComponentResources"] == ["{LogWorkspace}"]
            kinds["kql"] += 1
            text = c["query"]
            assert text.startswith("AppTraces\n") and "parse_json(Message)" in text
        referenced = set(re.findall(r"\{([A-Za-z_]\w*)(?::[^}]*)?\}", text))
        assert referenced <= names, f"{item['name']}: undefined parameters {referenced - names}"
    assert kinds["promql"] >= 40 and kinds["kql"] >= 4
    # Every Grafana view is in the workbook too (the node graph aside, which workbooks lack).
    headings = {item["name"] for item in wb["items"] if item["type"] == 1}
    for path in DASHBOARDS:
        assert f"{json.loads(path.read_text())['uid']}-heading" in headings


def test_every_metric_name_is_a_flowtel_name() -> None:
    allowed = DESIGN_NAMES | flowtel_names()
    used = {name for e in all_exprs() for name in METRIC_RE.findall(e.text)}
    assert used - allowed == set(), f"names flowtel does not define: {sorted(used - allowed)}"
    # The views cover every family DESIGN.md lists.
    assert DESIGN_NAMES <= used, f"not shown anywhere: {sorted(DESIGN_NAMES - used)}"


# --- a real Prometheus ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str]) -> None:
        if not Path(PROMETHEUS).exists():
            pytest.skip(f"{PROMETHEUS} is missing: run `make setup` (scripts/setup.sh installs Debian's prometheus)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{free_port()}"
        config = workdir / "prometheus.yml"
        scrape = [{"job_name": "flowtel", "static_configs": [{"targets": targets}]}] if targets else []
        config.write_text(json.dumps({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                                      "scrape_configs": scrape}))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def query(self, promql: str) -> dict[str, Any]:
        """The API's answer (status success or error), for an instant query at now."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:
            return json.load(exc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_every_promql_expression_parses_in_prometheus(tmp_path: Path) -> None:
    exprs = all_exprs()
    assert len(exprs) > 100
    prom = Prometheus(tmp_path, [])
    try:
        bad = {}
        for e in exprs:
            answer = prom.query(e.filled)
            if answer.get("status") != "success":
                bad[e.id] = (answer.get("errorType"), answer.get("error"), e.filled)
        assert not bad, json.dumps(bad, indent=1)
        # And a broken one is refused, so a pass means something.
        assert prom.query('sum by (x (rate(hubble_drop_total[30s]))')["status"] == "error"
    finally:
        prom.stop()


# --- evaluated against a running agent -----------------------------------------------------------


def data_test_config(glob: str, metrics_port: int, flows_port: int,
                     health_port: int | None = None) -> dict[str, Any]:
    """deploy/base/flowtel.yaml as the DaemonSet runs it, pointed at the test's pods, with
    Prometheus as the only exporter, short intervals, and what cannot run here left out
    (k8sattributes: no API server)."""
    cfg = yaml.safe_load((DEPLOY / "base" / "flowtel.yaml").read_text())
    cfg["receivers"]["ebpf"].update(
        interfaces=[glob], collection_interval="1s", dns={"timeout": "1s"},
        # The smallest flow map: the test's flood of distinct flows overflows it, so flows are
        # lost for real (FLOW_MAP_FULL) and hubble_lost_events_total has series.
        max_flows=1024,
        # Drops and TCP health (retransmissions), with their counters read every second.
        kernel_events={"drops": {"enabled": True}, "tcp": {"enabled": True},
                       "collection_interval": "1s", "poll_interval": "100ms"},
    )
    cfg["receivers"]["procfs"]["collection_interval"] = "1s"
    cfg["processors"] = {}
    cfg["connectors"].setdefault("servicegraph", {})["metrics_flush_interval"] = "1s"
    cfg["connectors"].setdefault("hubblemetrics", {})["interval"] = "1s"
    cfg["exporters"] = {"prometheus": {"endpoint": f"127.0.0.1:{metrics_port}"}}
    cfg["extensions"] = {"flows": {"endpoint": f"127.0.0.1:{flows_port}"}}
    cfg["service"]["extensions"] = ["flows"]
    if health_port is not None:
        # Readiness says every receiver has started (tc programs and tracepoints attached).
        cfg["extensions"]["health_check"] = {"endpoint": f"127.0.0.1:{health_port}"}
        cfg["service"]["extensions"].append("health_check")
    for spec in cfg["service"]["pipelines"].values():
        spec["processors"] = []
        spec["exporters"] = [e for e in spec["exporters"] if e in ("prometheus", *cfg["connectors"])]
    return cfg


def exposed_names(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.M)}


@dataclass
class LiveAgent:
    prometheus: Prometheus
    exposed: set[str]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    from testbed import Testbed, send_tcp, send_udp

    tmp = tmp_path_factory.mktemp("live")
    Testbed.cleanup_stale()
    with Testbed() as bed:
        client, server, dns = bed.add_pod("client"), bed.add_pod("server"), bed.add_pod("dns")
        metrics_port = free_port()
        health_port = free_port()
        cfg = data_test_config(bed.interface_glob, metrics_port, free_port(), health_port)
        (tmp / "flowtel.yaml").write_text(yaml.safe_dump(cfg))
        agent = subprocess.Popen([sys.executable, "-m", "flowtel.cli", "run", "--config", str(tmp / "flowtel.yaml")],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=(tmp / "agent.log").open("w"),
                                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NODE_NAME": "test-node"})
        prom = None
        try:
            deadline = time.monotonic() + 60
            while True:
                assert agent.poll() is None, (tmp / "agent.log").read_text()[-3000:]
                try:
                    # /metrics is up before the receivers attach: traffic made before then is
                    # never seen, so wait for readiness too.
                    exposed_names(metrics_port)
                    with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/", timeout=5):
                        break
                except OSError:
                    assert time.monotonic() < deadline, "agent did not serve /metrics and become ready within 60 s"
                    time.sleep(0.2)
            prom = Prometheus(tmp / "prometheus", [f"127.0.0.1:{metrics_port}"])
            # Traffic: DNS (answered, NXDOMAIN, unanswered), TCP, a reset, UDP, drops (no socket
            # and netfilter), retransmissions and lost events.
            bed.start_dnsmasq(dns, hosts={"api.shop.test": [server.ipv4]})
            bed.start_tcp_sink(server, 8080)
            bed.start_tcp_sink(server, 8090)
            bed.start_udp_sink(server, 9000)
            # In the server pod only: UDP to 7777 is dropped by netfilter, and one in five
            # non-SYN TCP packets to 8090 is lost, so the client retransmits. veth passes GSO
            # super-packets whole: at most 4 segments each keeps them many enough that some
            # are lost (as in receiver/ebpf/kernel_events/test_kernel_events.py).
            server.exec(["nft", "-f", "-"], input="""table inet flowtel_test {
    chain input {
        type filter hook input priority 0;
        udp dport 7777 drop
        tcp dport 8090 tcp flags & syn == 0 numgen random mod 5 == 0 drop
    }
}
""")
            client.exec(["ip", "link", "set", "dev", "eth0", "gso_max_segs", "4"])
            # Lost events: more distinct flows in one collection interval than the flow map
            # holds (max_flows 1024), one datagram each from its own socket, to the UDP sink.
            client.exec([sys.executable, "-c", f"""
import socket
for _ in range(3000):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"f", ("{server.ipv4}", 9000))
    u.close()
"""])
            for _ in range(2):
                client.exec(["dig", "+time=1", "+tries=1", f"@{dns.ipv4}", "api.shop.test"], check=False)
                client.exec(["dig", "+time=1", "+tries=1", f"@{dns.ipv4}", "nope.shop.test"], check=False)
                send_tcp(client, server.ipv4, 8080, 200_000)
                send_udp(client, server.ipv4, 9000, 20, 200)
            # No DNS server on `server`: unanswered query. Closed ports: RST and kernel drops.
            client.exec(["dig", "+time=1", "+tries=1", f"@{server.ipv4}", "api.shop.test"], check=False)
            client.exec([sys.executable, "-c", f"""
import socket
for port in (8081, 8082):
    s = socket.socket(); s.settimeout(1)
    try: s.connect(("{server.ipv4}", port))
    except OSError: pass
    s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5): u.sendto(b"x" * 64, ("{server.ipv4}", 9999))
for _ in range(5): u.sendto(b"x" * 64, ("{server.ipv4}", 7777))
"""], check=False)
            # Through the lossy rule: retransmissions.
            send_tcp(client, server.ipv4, 8090, 100_000, timeout=30)
            # And a steady trickle from then on, as on a real node: the connectors emit their
            # series as flows arrive, so there must be flows after the last of the above.
            client.popen([sys.executable, "-c", f"""
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
while True:
    u.sendto(b"tick", ("{server.ipv4}", 9000))
    time.sleep(0.2)
"""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # Collection (1 s), the unanswered-DNS timeout (1 s), flushes, then scrapes until
            # every exposed family has series with two samples (what rate() needs).
            time.sleep(4)
            deadline = time.monotonic() + 30
            while True:
                exposed = {n for n in exposed_names(metrics_port) if METRIC_RE.fullmatch(n)}
                if all(prom.query(f"count_over_time({n}[30s]) >= 2")["data"]["result"] for n in exposed):
                    break
                assert time.monotonic() < deadline, "Prometheus did not get two scrapes of every family in 30 s"
                time.sleep(0.5)
            yield LiveAgent(prom, exposed_names(metrics_port))
        finally:
            if prom is not None:
                prom.stop()
            agent.terminate()
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


EVALUATED = [e for e in all_exprs() if e.evaluate]


@pytest.mark.kernel
@pytest.mark.parametrize("expr", EVALUATED, ids=[e.id for e in EVALUATED])
def test_expression_returns_data_from_a_running_agent(live: LiveAgent, expr: Expr) -> None:
    missing = sorted(set(METRIC_RE.findall(expr.text)) - live.exposed)
    assert not missing, f"the dashboards query {', '.join(missing)}, which the running agent does not expose"
    # A series born in the last second (an edge, a new drop reason) needs one more scrape.
    deadline = time.monotonic() + 5
    while True:
        answer = live.prometheus.query(expr.filled)
        assert answer["status"] == "success", answer
        if answer["data"]["result"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert answer["data"]["result"], f"no data for {expr.filled}"
