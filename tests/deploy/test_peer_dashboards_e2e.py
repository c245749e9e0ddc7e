"""The dashboards ACNS, Retina and Hubble users already have, against flowtel run with each
shipped config: a real Prometheus (Debian's binary) scrapes the agent while network-namespace
pods, named by a stand-in Kubernetes API server, make TCP, UDP, ICMP and DNS traffic (answered,
NXDOMAIN, unanswered), closed-port and nftables drops, resets and retransmissions.

What those dashboards select on is written below as facts (metric, label matchers, and the
sources of their variables), read from their JSON:
  microsoft/retina deploy/grafana-dashboards/clusters.json, hubble-dns.json,
  hubble-pod-flows-namespace.json, hubble-pod-flows-workload.json, standard-dns.json
  (the ACNS "Kubernetes / Networking" set, grafana.com 22835-22837);
  cilium/cilium install/kubernetes/cilium/files/hubble/dashboards/hubble-dashboard.json,
  hubble-network-overview-namespace.json, hubble-dns-namespace.json.
Every fact must find series for every config it applies to, with the variables filled as
Grafana fills them (from the same Prometheus). What those dashboards query that flowtel does
not have, or that their own agent never emits, is listed in deploy/dashboards/README.md and
in NOT_FACTS below, with the reason.

One agent at a time (their tc programs would replace each other's), one testbed, one API
server, one Prometheus for all runs. The collector overlays send metrics as OTLP to an
OpenTelemetry Collector whose prometheus exporter keeps names and labels
(add_metric_suffixes: false); no Collector binary is installable here, so for those two the
agent's own prometheus exporter stands in for that hop, with the shipped receivers,
connectors and metric strings unchanged. Retina's and Hubble's default metric strings run in
the deploy/base and config/flowtel.yaml runs (with and without pod names) as extra named
connectors with their own exporters, so the agent is shown to start with them and to label
series as they do.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.deploy.manifests import DEPLOY, REPO

pytestmark = pytest.mark.kernel

PROMETHEUS = "/usr/bin/prometheus"
CLUSTER = "flowtel-e2e"  # the scrape's target label, as Azure Managed Prometheus or a relabel rule adds it
NODE = "i18-node"
NAMESPACE = "shop"
CLIENT_POD, SERVER_POD, DNS_POD = "frontend-6d4b9c-x2k8p", "payments-0", "coredns-5d78c9-q7w2e"

SHIPPED = {
    "config/flowtel.yaml": REPO / "config" / "flowtel.yaml",
    "deploy/base": DEPLOY / "base" / "flowtel.yaml",
    "overlays/prometheus-only": DEPLOY / "overlays" / "prometheus-only" / "flowtel.yaml",
    "overlays/collector-sidecar": DEPLOY / "overlays" / "collector-sidecar" / "flowtel.yaml",
    "overlays/collector-gateway": DEPLOY / "overlays" / "collector-gateway" / "flowtel.yaml",
}
# config/flowtel.yaml is the agent outside Kubernetes: no k8sattributes, so no pod names.
WITHOUT_PODS = {"config/flowtel.yaml"}

# Retina's Helm default (deploy/hubble/manifests/controller/helm/retina/values.yaml,
# hubble.metrics.enabled) and the example in Cilium's metrics documentation.
RETINA_DEFAULT = ["flow:sourceEgressContext=pod;destinationIngressContext=pod",
                  "tcp:sourceEgressContext=pod;destinationIngressContext=pod",
                  "dns:query;sourceEgressContext=pod;destinationIngressContext=pod",
                  "drop:sourceEgressContext=pod;destinationIngressContext=pod"]
HUBBLE_EXAMPLE = ["dns:query;ignoreAAAA", "drop", "tcp", "flow", "port-distribution", "icmp", "http"]
STRINGS_RUNS = ("deploy/base", "config/flowtel.yaml")


# --- what the peer dashboards select on ----------------------------------------------------------

# The selectors every panel of a dashboard carries.
RETINA = 'cluster="$cluster", instance=~"$Nodes"'
CILIUM = 'cluster=~"$cluster"'


@dataclass(frozen=True)
class Fact:
    dashboard: str
    metric: str
    matchers: str  # PromQL label matchers; $variables as in the dashboard
    pods: bool = False  # needs Kubernetes names (not in config/flowtel.yaml, which has none)

    @property
    def id(self) -> str:
        return f"{self.dashboard}:{self.metric}{{{self.matchers}}}"


def facts(dashboard: str, base: str, rows: list[tuple[str, str]], pods: bool = False) -> list[Fact]:
    return [Fact(dashboard, m, ", ".join(x for x in (base, extra) if x), pods) for m, extra in rows]


N = "networkobservability_"
FLOWS, TCP, DROPS = "hubble_flows_processed_total", "hubble_tcp_flags_total", "hubble_drop_total"
QUERIES, RESPONSES = "hubble_dns_queries_total", "hubble_dns_responses_total"
NS_SRC, NS_DST = 'source=~"^$namespace/.*"', 'destination=~"^$namespace/.*"'
WL_SRC, WL_DST = 'source=~"^$namespace/$workload"', 'destination=~"^$namespace/$workload"'

FACTS: list[Fact] = [
    # Kubernetes / Networking / Retina / Clusters (clusters.json)
    *facts("retina-clusters", RETINA, [
        (N + "forward_bytes", 'direction="egress"'), (N + "forward_bytes", 'direction="ingress"'),
        (N + "forward_count", 'direction="egress"'), (N + "forward_count", 'direction="ingress"'),
        (N + "drop_count", 'direction="ingress"'), (N + "drop_count", 'direction="unknown"'),
        (N + "drop_count", 'reason="IPTABLE_RULE_DROP"'), (N + "drop_bytes", 'reason=~".+"'),
        (N + "interface_stats", 'statistic_name="rx_dropped"'),
        (N + "interface_stats", 'statistic_name="tx_dropped"'),
        (N + "interface_stats", 'statistic_name="rx_packets", interface_name=~".+"'),
        (N + "interface_stats", 'statistic_name="tx_packets", interface_name=~".+"'),
        (N + "tcp_state", 'state="ESTABLISHED"'), (N + "tcp_state", 'state="LISTEN"'),
        (N + "tcp_connection_remote", 'address!~"127.0.0.1|0.0.0.0"'),
    ]),
    # Kubernetes / Networking / Retina (Hubble) / DNS (hubble-dns.json)
    *facts("retina-hubble-dns", RETINA, [
        (QUERIES, 'qtypes="A"'), (QUERIES, r'query=~"api\\.shop\\.test\\.?"'),
        (RESPONSES, 'rcode="No Error", ips_returned="1"'), (RESPONSES, 'rcode="Non-Existent Domain"'),
        (RESPONSES, r'query=~"nope\\.shop\\.test\\.?", qtypes="A"'),
    ]),
    *facts("retina-hubble-dns", RETINA, [(RESPONSES, 'rcode!="No Error", destination=~".*/.*"')], pods=True),
    # Kubernetes / Networking / Retina (Hubble) / Pod Flows (Namespace)
    *facts("retina-pod-flows-namespace", RETINA, [
        (FLOWS, NS_SRC + ', verdict="FORWARDED"'), (FLOWS, NS_DST + ', verdict="FORWARDED"'),
        (FLOWS, NS_SRC + ', verdict="DROPPED"'), (FLOWS, NS_DST + ', verdict="DROPPED"'),
        (FLOWS, NS_SRC + ', type="Trace", subtype=~".+"'),
        (TCP, NS_SRC + ', flag="SYN"'), (TCP, NS_DST + ', flag="SYN-ACK"'),
        (TCP, NS_SRC + ', flag="RST"'), (TCP, NS_DST + ', flag="RST"'),
        (TCP, NS_SRC + ', flag="FIN"'), (TCP, NS_DST + ', flag="FIN"'),
    ], pods=True),
    # Kubernetes / Networking / Retina (Hubble) / Pod Flows (Workload)
    *facts("retina-pod-flows-workload", RETINA, [
        (FLOWS, WL_SRC + ', verdict="FORWARDED"'), (FLOWS, WL_DST + ', verdict="FORWARDED"'),
        (FLOWS, WL_SRC + ', verdict="DROPPED"'), (FLOWS, WL_DST + ', verdict="DROPPED"'),
        (TCP, WL_SRC + ', flag="SYN"'), (TCP, WL_DST + ', flag="SYN-ACK"'),
        (TCP, WL_SRC + ', flag="RST"'), (TCP, WL_DST + ', flag="RST"'),
        (TCP, WL_SRC + ', flag="FIN"'), (TCP, WL_DST + ', flag="FIN"'),
    ], pods=True),
    # Kubernetes / Networking / Retina (Standard) / DNS: its unlabelled panels
    *facts("retina-standard-dns", 'cluster="$cluster"', [
        (N + "dns_request_count", ""), (N + "dns_response_count", ""),
    ]),
    # Hubble (hubble-dashboard.json): no variables; by the scrape's pod label
    *facts("hubble", "", [
        (FLOWS, 'type="Trace", subtype=~".+"'), (FLOWS, 'type="L7", subtype="DNS"'),
        (FLOWS, 'verdict="DROPPED"'), (DROPS, 'reason=~".+"'),
        (TCP, 'family="IPv4", flag="SYN"'), (TCP, 'family="IPv4", flag="SYN-ACK"'),
        (TCP, 'family="IPv4", flag="FIN"'), (TCP, 'family="IPv4", flag="RST"'),
        ("hubble_port_distribution_total", 'port!="0", protocol="TCP"'),
        ("hubble_port_distribution_total", 'port!="0", protocol="UDP"'),
        ("hubble_icmp_total", 'family="IPv4", type="EchoRequest"'),
        ("hubble_icmp_total", 'family="IPv4", type="EchoReply"'),
        (TCP, 'family="IPv6", flag="SYN"'), (TCP, 'family="IPv6", flag="SYN-ACK"'),
        ("hubble_icmp_total", 'family="IPv6", type="EchoRequest"'),
        ("hubble_icmp_total", 'family="IPv6", type="EchoReply"'),
        (QUERIES, 'qtypes=~".+"'), (RESPONSES, 'rcode=~".+"'),
        ("hubble_dns_response_types_total", 'type="A"'),
    ]),
    # Hubble / Network Overview (Namespace)
    *facts("hubble-network-overview-namespace", CILIUM, [
        (FLOWS, 'source_namespace=~"$source_namespace", destination_namespace=~"$destination_namespace", '
                'source=~".+"'),
        (FLOWS, 'source_namespace=~"$source_namespace", destination_namespace=~"$destination_namespace", '
                'destination=~".+"'),
        (TCP, 'source_namespace=~"$source_namespace", flag="SYN", source=~".+"'),
        (TCP, 'destination_namespace=~"$source_namespace", flag="SYN-ACK", destination=~".+"'),
        (DROPS, 'source_namespace=~"$source_namespace", reason=~".+", destination=~".+"'),
        (DROPS, 'source_namespace=~"$source_namespace", reason=~".+", source=~".+"'),
    ], pods=True),
    # Hubble / DNS Overview (Namespace)
    *facts("hubble-dns-namespace", CILIUM, [
        (QUERIES, 'source_namespace=~"$source_namespace", source=~".+"'),
        (QUERIES, r'source_namespace=~"$source_namespace", query=~"api\\.shop\\.test\\.?"'),
        (RESPONSES, 'destination_namespace=~"$source_namespace", destination=~".+"'),
        (RESPONSES, 'destination_namespace=~"$source_namespace", rcode!="No Error"'),
    ], pods=True),
]

# What those dashboards query that these facts leave out, and why (deploy/dashboards/README.md).
NOT_FACTS = {
    "retina-clusters": "drop_count{direction=egress}: Retina files a drop as egress only for a failed TCP "
                       "connect() (TCP_CONNECT_BASIC), no packet drop; tcp_connection_stats statistic_name "
                       "tcptimeouts/resetcount/tcptsreorder and tcp_flag_counters: Retina never emits them "
                       "(it emits TCPTimeouts, TCPTSReorder; no tcp_flag_counters metric exists); "
                       "interface_stats rx_comp_full, tx_send_full, rxN_cache_full, txN_nop: driver ethtool "
                       "statistics, flowtel reads /proc/net/dev; udp_connection_stats{statistic_name=active}: "
                       "flowtel's open-socket gauge is networkobservability_udp_active_sockets",
    "retina-standard-dns": "query_type, return_code, num_response, query, response labels: Retina's "
                           "dns_request_count/dns_response_count have no labels; $cluster/$Nodes come from "
                           "kube-state-metrics' kube_node_info",
    "retina-standard-pod-level": "networkobservability_adv_* (Retina's advanced mode): flowtel's pod level is Hubble's",
    "retina-pod-flows-workload": "$workload is label_values(kube_pod_info, pod) from kube-state-metrics; the test "
                                 "fills it with the pod names the API server holds",
    "hubble-l7-http-metrics-by-workload": "hubble_http_*: flowtel parses no HTTP",
}


# --- Prometheus ------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """Debian's prometheus scraping the given targets every 2 s, each with the cluster
    label a real deployment's scrape adds, and the config run's name."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        if not Path(PROMETHEUS).exists():
            pytest.skip(f"{PROMETHEUS} is missing: run `make setup` (scripts/setup.sh installs Debian's prometheus)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{free_port()}"
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "2s", "scrape_timeout": "2s"},
            "scrape_configs": [{"job_name": "flowtel", "static_configs": [
                {"targets": [target], "labels": {"cluster": CLUSTER, "run": run}} for run, target in targets.items()]}],
        }))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus not ready: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def get(self, path: str, **params: str) -> Any:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def series(self, promql: str) -> list[dict[str, str]]:
        return [s["metric"] for s in self.get("query", query=promql)["result"]]

    def label_values(self, label: str, match: str) -> set[str]:
        return set(self.get(f"label/{label}/values", **{"match[]": match}))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- variables, as Grafana fills them --------------------------------------------------------

def grafana_regex_values(series: list[dict[str, str]], regex: str) -> set[str]:
    """A query_result() variable: Grafana matches the regex against each series' text
    ``name{label="value", …}`` and takes the first group."""
    out = set()
    for s in series:
        name = s.get("__name__", "")
        text = name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(s.items()) if k != "__name__") + "}"
        m = re.search(regex, text)
        if m:
            out.add(m.group(1))
    return out


def variables(prom: Prometheus, run: str, instance: str, workload: str) -> tuple[dict[str, str], list[str]]:
    """Every variable of those dashboards for this run, each from its own source: the values
    found, and for each source that does not offer this run's value, what is wrong. (A fact
    that uses a variable without a value fails; the others are checked regardless.)"""
    values: dict[str, str] = {"workload": prom_regex(workload)}
    problems: list[str] = []
    if CLUSTER in prom.label_values("cluster", "up"):  # Retina: label_values(up, cluster)
        values["cluster"] = CLUSTER
    else:
        problems.append("label_values(up, cluster) lacks the scrape's cluster")
    if instance in prom.label_values("instance", f'up{{cluster="{CLUSTER}"}}'):  # label_values(up{cluster}, instance)
        values["Nodes"] = prom_regex(instance)
    else:
        problems.append("label_values(up{cluster}, instance) lacks the agent")
    # Cilium: label_values(cilium_version, cluster)
    if CLUSTER not in prom.label_values("cluster", f'cilium_version{{instance="{instance}"}}'):
        problems.append("no cilium_version series: Cilium's and Hubble's dashboards would have no $cluster")
    if run in WITHOUT_PODS:
        return values, problems
    # Retina Pod Flows: query_result(label_replace(flows, "ns", "$1", "destination"|"source", "(.*)")),
    # regex /ns="([-a-z0-9]+)/.*/
    sel = f'cluster="{CLUSTER}", instance=~"{prom_regex(instance)}"'
    namespaces = grafana_regex_values(prom.series(
        f'label_replace({FLOWS}{{{sel}}}, "ns", "$1", "destination", "(.*)") or '
        f'label_replace({FLOWS}{{{sel}}}, "ns", "$1", "source", "(.*)")'), r'ns="([-a-z0-9]+)/.*')
    if NAMESPACE in namespaces:
        values["namespace"] = NAMESPACE
    else:
        problems.append(f"$namespace (from source/destination of {FLOWS}) lacks {NAMESPACE!r}: {sorted(namespaces)}")
    # Cilium: label_values(source_namespace), label_values(destination_namespace)
    for name in ("source_namespace", "destination_namespace"):
        if NAMESPACE in prom.label_values(name, f'{{instance="{instance}"}}'):
            values[name] = NAMESPACE if name == "source_namespace" else ".*"
        else:
            problems.append(f"label_values({name}) lacks {NAMESPACE!r}")
    return values, problems


def prom_regex(value: str) -> str:
    """A value as a regular expression inside a PromQL string (Grafana escapes regex
    characters of a variable's value; PromQL strings escape the backslash)."""
    return re.escape(value).replace("\\", "\\\\")


def fill(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], text)


# --- the agent, with a shipped config adapted to the testbed --------------------------------

def agent_config(shipped: Path, *, glob: str, metrics_port: int, health_port: int, kubeconfig: str,
                 pin_dir: str, flow_log: Path, extra_metrics: dict[str, tuple[list[str], int]]) -> dict[str, Any]:
    """The shipped file with only what a test host needs changed: the testbed's interfaces,
    one-second intervals, the stand-in API server, loopback ports, a pin directory of its own,
    and flowtel's prometheus exporter in place of the OTLP hop to a Collector."""
    cfg = copy.deepcopy(yaml.safe_load(shipped.read_text()))
    ebpf = cfg["receivers"]["ebpf"]
    ebpf.update(interfaces=[glob], collection_interval="1s", dns={"timeout": "1s"})
    ebpf.setdefault("kernel_events", {}).update(collection_interval="1s", poll_interval="100ms")
    cfg["receivers"]["procfs"]["collection_interval"] = "1s"
    if "fqdnpolicy" in cfg["receivers"]:
        cfg["receivers"]["fqdnpolicy"].update(pin_dir=pin_dir, collection_interval="1s")
    if "k8sattributes" in cfg.get("processors", {}):
        cfg["processors"]["k8sattributes"].update(auth_type="kubeConfig", kubeconfig=kubeconfig)
    cfg["connectors"]["hubblemetrics"]["interval"] = "1s"
    if "servicegraph" in cfg["connectors"]:
        cfg["connectors"]["servicegraph"]["metrics_flush_interval"] = "1s"
    exporters = {"prometheus": {"endpoint": f"127.0.0.1:{metrics_port}"}}
    if "file" in cfg["exporters"]:
        exporters["file"] = {**cfg["exporters"]["file"], "path": str(flow_log)}
    cfg["exporters"] = exporters
    cfg["extensions"] = {"health_check": {"endpoint": f"127.0.0.1:{health_port}"}}
    cfg["service"]["extensions"] = ["health_check"]
    for name, spec in cfg["service"]["pipelines"].items():
        spec["exporters"] = [e for e in spec["exporters"] if e in exporters or e in cfg["connectors"]]
        if name.startswith("metrics") and "prometheus" not in spec["exporters"]:
            spec["exporters"].append("prometheus")
    logs = next(spec for name, spec in cfg["service"]["pipelines"].items() if name.split("/")[0] == "logs")
    for name, (metrics, port) in extra_metrics.items():
        # Another hubblemetrics with other strings, on an exporter of its own (names would clash).
        cfg["connectors"][f"hubblemetrics/{name}"] = {"metrics": metrics, "interval": "1s", "version_info": False}
        cfg["exporters"][f"prometheus/{name}"] = {"endpoint": f"127.0.0.1:{port}"}
        logs["exporters"].append(f"hubblemetrics/{name}")
        cfg["service"]["pipelines"][f"metrics/{name}"] = {
            "receivers": [f"hubblemetrics/{name}"], "exporters": [f"prometheus/{name}"]}
    return cfg


@dataclass
class Run:
    name: str
    instance: str
    # fact id (and "__variables__") -> "" when found, else what was missing
    found: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # exposition of the extra connectors
    dns_truth: dict[str, Any] = field(default_factory=dict)  # what dig sent and got (dns_panels' form)
    dns_panels: dict[str, Any] = field(default_factory=dict)  # what the DNS dashboards' queries returned


def dig(client: Any, server: str, name: str, statuses: Counter[str]) -> None:
    """One query (+tries=1: dig sends it once) of type A; its answer's status, as dig printed
    it, counted in ``statuses`` ("" for no answer)."""
    res = client.exec(["dig", "+time=1", "+tries=1", f"@{server}", name], check=False)
    m = re.search(r"status: (\w+)", res.stdout)
    statuses[m.group(1) if m else ""] += 1


def traffic(client: Any, server: Any, dns: Any) -> Counter[str]:
    """TCP, UDP, ICMP (IPv4 and IPv6, TCP over both), DNS (answered, NXDOMAIN, unanswered),
    closed ports (RST, NO_SOCKET), nftables drops in and out, retransmissions. Returns the DNS
    queries sent, by the status of their answer per dig ("" for none)."""
    from testbed import send_ping, send_tcp, send_udp

    statuses: Counter[str] = Counter()
    for _ in range(2):
        dig(client, dns.ipv4, "api.shop.test", statuses)
        dig(client, dns.ipv4, "nope.shop.test", statuses)
        send_tcp(client, server.ipv4, 8080, 100_000)
        send_udp(client, server.ipv4, 9000, 20, 200)
    send_ping(client, server.ipv4, 3, interval=0.05)
    send_ping(client, str(server.ipv6), 3, interval=0.05)
    send_tcp(client, str(server.ipv6), 8080, 20_000)
    dig(client, server.ipv4, "api.shop.test", statuses)  # unanswered: nothing listens there
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
for _ in range(5): u.sendto(b"x" * 64, ("{server.ipv4}", 7778))
"""], check=False)
    send_tcp(client, server.ipv4, 8090, 60_000, timeout=30)  # through the lossy rule
    return statuses


# The DNS panels of Retina's hubble-dns.json and standard-dns.json, as instant queries of their
# counters (the panels take rate() of the same selections; a test compares totals). Each gives
# {label value: number} by the panel's grouping ("" when it has none).
DNS_PANELS = {
    # hubble-dns.json "DNS Requests" / "DNS Responses" / "DNS Missing Response" (by qtypes)
    "hubble queries by qtypes": ("sum (hubble_dns_queries_total{%s}) by (qtypes)", "qtypes"),
    "hubble responses by qtypes": ("sum (hubble_dns_responses_total{%s}) by (qtypes)", "qtypes"),
    "hubble missing response %": ("(1 - (sum (hubble_dns_responses_total{%s}) by (qtypes) / "
                                  "sum (hubble_dns_queries_total{%s}) by (qtypes))) * 100", "qtypes"),
    # hubble-dns.json "DNS Errors" (by rcode, before its label_replace) and "Top Pods with DNS Errors"
    "hubble responses by rcode": ("sum by (rcode) (hubble_dns_responses_total{%s})", "rcode"),
    "hubble error responses by destination": (
        'sum(hubble_dns_responses_total{%s, rcode!="No Error", destination=~".*/.*"}) by (destination)',
        "destination"),
    # standard-dns.json "DNS Requests" / "DNS Responses"
    "requests": ("sum (networkobservability_dns_request_count{%s})", ""),
    "responses": ("sum (networkobservability_dns_response_count{%s})", ""),
}
DNS_RCODES = {"NOERROR": "No Error", "NXDOMAIN": "Non-Existent Domain"}


def dns_truth(statuses: Counter[str], pods: bool) -> dict[str, Any]:
    """What each DNS panel must show for the queries dig sent: one request per query, one
    response per answer, as Retina and Hubble count them."""
    sent, answered = sum(statuses.values()), sum(n for s, n in statuses.items() if s)
    errors = sum(n for s, n in statuses.items() if s and s != "NOERROR")
    return {
        "hubble queries by qtypes": {"A": sent},
        "hubble responses by qtypes": {"A": answered},
        "hubble missing response %": {"A": round((1 - answered / sent) * 100, 6)},
        "hubble responses by rcode": {DNS_RCODES[s]: n for s, n in statuses.items() if s},
        "hubble error responses by destination": {f"{NAMESPACE}/{CLIENT_POD}": errors} if pods else {},
        "requests": {"": sent},
        "responses": {"": answered},
    }


def dns_panels(prom: Prometheus, run: str, values: dict[str, str]) -> dict[str, Any]:
    sel = f'{fill(RETINA, values)}, run="{run}"'
    out: dict[str, Any] = {}
    for panel, (expr, by) in DNS_PANELS.items():
        result = prom.get("query", query=expr.replace("%s", sel))["result"]
        out[panel] = {r["metric"].get(by, "") if by else "": round(float(r["value"][1]), 6) for r in result}
    return out

@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    from testbed import Testbed
    from tests.kubeapi import FakeApiServer
    from tests.kubeapi import objects as o

    tmp = tmp_path_factory.mktemp("peer-dashboards")
    Testbed.cleanup_stale()
    ports = {run: free_port() for run in SHIPPED}
    api = FakeApiServer(bookmark_interval=0.5).start()
    prom = None
    try:
        with Testbed() as bed:
            # Client and server dual-stack: the Hubble dashboard has TCPv6 and ICMPv6 panels.
            client, server = bed.add_pod("client", ipv6=True), bed.add_pod("server", ipv6=True)
            dns = bed.add_pod("dns")
            api.create("namespaces", o.namespace(NAMESPACE))
            api.create("namespaces", o.namespace("kube-system"))
            api.create("nodes", o.node(NODE, internal_ip="192.0.2.10", pod_cidr=str(bed.ipv4_network)))
            api.create("replicasets", o.replicaset("frontend-6d4b9c", NAMESPACE, deployment="frontend"))
            api.create("replicasets", o.replicaset("coredns-5d78c9", "kube-system", deployment="coredns"))
            api.create("pods", o.pod(CLIENT_POD, NAMESPACE, ips=(client.ipv4, str(client.ipv6)), node=NODE,
                                     labels={"app": "frontend", "pod-template-hash": "6d4b9c"},
                                     owner=("ReplicaSet", "frontend-6d4b9c")))
            api.create("pods", o.pod(SERVER_POD, NAMESPACE, ips=(server.ipv4, str(server.ipv6)), node=NODE,
                                     labels={"app": "payments"},
                                     owner=("StatefulSet", "payments")))
            api.create("pods", o.pod(DNS_POD, "kube-system", ip=dns.ipv4, node=NODE,
                                     labels={"k8s-app": "kube-dns", "pod-template-hash": "5d78c9"},
                                     owner=("ReplicaSet", "coredns-5d78c9")))
            kubeconfig = api.write_kubeconfig(str(tmp / "kubeconfig"))
            bed.start_dnsmasq(dns, hosts={"api.shop.test": [server.ipv4]})
            bed.start_tcp_sink(server, 8080)
            bed.start_tcp_sink(server, 8090)
            bed.start_udp_sink(server, 9000)
            # Server input: UDP 7777 dropped, one in five non-SYN TCP segments to 8090 lost
            # (retransmissions); client output: UDP 7778 dropped. veth passes GSO super-packets
            # whole: at most 4 segments each keeps them many enough that some are lost.
            server.exec(["nft", "-f", "-"], input="""table inet flowtel_i18_peer {
    chain input {
        type filter hook input priority 0;
        udp dport 7777 drop
        tcp dport 8090 tcp flags & syn == 0 numgen random mod 5 == 0 drop
    }
}
""")
            client.exec(["nft", "-f", "-"], input="""table inet flowtel_i18_peer {
    chain output {
        type filter hook output priority 0;
        udp dport 7778 drop
    }
}
""")
            client.exec(["ip", "link", "set", "dev", "eth0", "gso_max_segs", "4"])
            targets = {run: f"127.0.0.1:{port}" for run, port in ports.items()}
            prom = Prometheus(tmp / "prometheus", targets)
            results: dict[str, Run] = {}
            for run, shipped in SHIPPED.items():
                # Retina's and Hubble's strings ride along where there are pod names and where not.
                extra = ({"retina": (RETINA_DEFAULT, free_port()), "hubble": (HUBBLE_EXAMPLE, free_port())}
                         if run in STRINGS_RUNS else {})
                results[run] = run_one(tmp / run.replace("/", "_"), run, shipped, bed, (client, server, dns),
                                       prom, targets[run], ports[run], kubeconfig, extra)
            yield results
    finally:
        if prom is not None:
            prom.stop()
        api.stop()


def run_one(tmp: Path, run: str, shipped: Path, bed: Any, pods: tuple[Any, Any, Any], prom: Prometheus,
            instance: str, port: int, kubeconfig: str, extra: dict[str, tuple[list[str], int]]) -> Run:
    tmp.mkdir(parents=True)
    health = free_port()
    cfg = agent_config(shipped, glob=bed.interface_glob, metrics_port=port, health_port=health,
                       kubeconfig=kubeconfig, pin_dir=f"/sys/fs/bpf/flowtel-i18-{bed.interface_glob.strip('*')}",
                       flow_log=tmp / "flows.log", extra_metrics=extra)
    (tmp / "flowtel.yaml").write_text(yaml.safe_dump(cfg))
    stderr = tmp / "agent.log"
    agent = subprocess.Popen([sys.executable, "-m", "flowtel.cli", "run", "--config", str(tmp / "flowtel.yaml")],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr.open("w"),
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NODE_NAME": NODE})
    result = Run(run, instance)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert agent.poll() is None, f"{run}: the agent exited: {stderr.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"{run}: not ready in 120 s: {stderr.read_text()[-3000:]}"
                time.sleep(0.3)
        truth = dns_truth(traffic(*pods), pods=run not in WITHOUT_PODS)
        # Collection (1 s), the unanswered-DNS timeout (1 s), flushes, scrapes; then every
        # fact gets up to 30 s (a loaded machine) to find its series.
        wanted = [f for f in FACTS if not (f.pods and run in WITHOUT_PODS)]
        deadline = time.monotonic() + 30
        while True:
            missing = check(prom, run, instance, wanted, result.found)
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1)
        # The DNS panels' values, once the last answers and the unanswered query have been
        # counted, flushed and scraped (each an instant query of a counter that only grows).
        result.dns_truth = truth
        panel_values, _ = variables(prom, run, instance, CLIENT_POD)
        deadline = time.monotonic() + 30
        while True:
            result.dns_panels = dns_panels(prom, run, panel_values)
            if result.dns_panels == truth or time.monotonic() > deadline:
                break
            time.sleep(1)
        for name, (_, extra_port) in extra.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{extra_port}/metrics", timeout=5) as r:
                result.extra[name] = r.read().decode()
    finally:
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    log = stderr.read_text()
    # A scrape Prometheus gave up on (timeout on a loaded machine) is a broken pipe in
    # http.server's handler, which prints it; anything else is a failure.
    other = [t for t in log.split("Traceback (most recent call last):")[1:] if "BrokenPipeError" not in t]
    assert not other, f"{run}: {log[-3000:]}"
    result.extra["__log__"] = log
    return result


def check(prom: Prometheus, run: str, instance: str, wanted: list[Fact], found: dict[str, str]) -> list[str]:
    """Fill ``found`` (the variables, then every fact); what is still missing."""
    # A workload fact holds when a user picking one of the namespace's workloads sees data.
    by_workload = [variables(prom, run, instance, w) for w in (CLIENT_POD, SERVER_POD)]
    problems = by_workload[0][1]
    found["__variables__"] = "; ".join(problems)
    missing = ["__variables__"] if problems else []
    for fact in wanted:
        if found.get(fact.id) == "":
            continue
        used = set(re.findall(r"\$(\w+)", fact.matchers))
        selectors = [", ".join(x for x in (fill(fact.matchers, values), f'run="{run}"') if x)
                     for values, _ in (by_workload if "workload" in used else by_workload[:1])
                     if used <= set(values)]
        if not selectors:
            found[fact.id] = f"a variable has no value: {'; '.join(problems)}"
        elif any(prom.series(f"{fact.metric}{{{sel}}}") for sel in selectors):
            found[fact.id] = ""
            continue
        else:
            found[fact.id] = f"no series for {fact.metric}{{{selectors[0]}}}"
        missing.append(fact.id)
    return missing


CASES = [(run, fact) for run in SHIPPED for fact in FACTS if not (fact.pods and run in WITHOUT_PODS)]


@pytest.mark.parametrize("run, fact", CASES, ids=[f"{run}:{fact.id}" for run, fact in CASES])
def test_peer_dashboard_fact_finds_series(runs: dict[str, Run], run: str, fact: Fact) -> None:
    assert runs[run].found.get(fact.id) == "", runs[run].found.get(fact.id, "not checked")


@pytest.mark.parametrize("run", list(SHIPPED))
def test_dns_panels_show_one_request_per_query_and_one_response_per_answer(runs: dict[str, Run], run: str) -> None:
    """The values, not only the series: Retina's DNS dashboards over flowtel show what dig sent
    and got (a query between two pods crosses two observed veths and is still one request)."""
    truth = runs[run].dns_truth
    assert truth["requests"] == {"": 5} and truth["responses"] == {"": 4}  # 2 answered, 2 NXDOMAIN, 1 not
    assert runs[run].dns_panels == truth


@pytest.mark.parametrize("run", list(SHIPPED))
def test_every_dashboard_variable_has_this_runs_value(runs: dict[str, Run], run: str) -> None:
    assert runs[run].found["__variables__"] == ""


def test_not_facts_say_why() -> None:
    # Every dashboard a fact is about, or whose gaps are listed, is in the README table.
    readme = (DEPLOY / "dashboards" / "README.md").read_text()
    for dashboard in {f.dashboard for f in FACTS} | set(NOT_FACTS):
        assert f"`{dashboard}`" in readme, dashboard


def _series_labels(exposition: str, metric: str) -> list[dict[str, str]]:
    out = []
    for line in exposition.splitlines():
        if line.startswith(metric + "{"):
            body = line[len(metric) + 1:line.rindex("}")]
            out.append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body)))
    return out


def test_retina_default_strings_label_each_pods_own_traffic(runs: dict[str, Run]) -> None:
    """The agent starts with Retina's Helm default and labels as Retina's Hubble does:
    ``source`` on what a pod sent (EGRESS), ``destination`` on what it received (INGRESS)."""
    text = runs["deploy/base"].extra["retina"]
    flows = _series_labels(text, FLOWS)
    assert flows and all({"source", "destination"} <= set(s) for s in flows)
    sent = {s["source"] for s in flows if s["source"]}
    received = {s["destination"] for s in flows if s["destination"]}
    assert f"{NAMESPACE}/{CLIENT_POD}" in sent and f"{NAMESPACE}/{SERVER_POD}" in sent, sent
    assert f"{NAMESPACE}/{CLIENT_POD}" in received and f"{NAMESPACE}/{SERVER_POD}" in received, received
    # Never both on one series: a record is one pod's egress or the other pod's ingress.
    assert not [s for s in flows if s["source"] and s["destination"]], flows
    assert _series_labels(text, "hubble_dns_queries_total") and _series_labels(text, TCP)
    # Without k8sattributes (config/flowtel.yaml) the same strings start too.
    assert _series_labels(runs["config/flowtel.yaml"].extra["retina"], FLOWS)


def test_hubble_example_strings_start_and_http_has_no_series(runs: dict[str, Run]) -> None:
    for run in ("deploy/base", "config/flowtel.yaml"):
        text = runs[run].extra["hubble"]
        for metric in (FLOWS, TCP, DROPS, "hubble_port_distribution_total", "hubble_icmp_total", QUERIES):
            assert _series_labels(text, metric), (run, metric)
        assert "hubble_http" not in text
        assert "'http' has no series" in runs[run].extra["__log__"]
