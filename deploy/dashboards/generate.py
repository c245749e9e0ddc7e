"""Writes flowtel's Grafana dashboards (deploy/dashboards/*.json) and its Azure Monitor
workbook (deploy/azure/workbook.json) from one set of queries.

    python deploy/dashboards/generate.py           # rewrite the JSON files
    python deploy/dashboards/generate.py --check   # exit 1 if they differ from the output

The views are the ones ACNS ships (cluster network overview, DNS for the cluster and for a
workload, drops for a workload, pod flows for a namespace and for a workload) plus the
service map, on flowtel's metric names (DESIGN.md section 4): node level
``networkobservability_*``, pod level ``hubble_*`` with the labelsContext labels of
deploy/*/flowtel.yaml (``source_namespace``, ``source_workload``, ``source_pod``, …), and
flowtel's own ``flowtel_*``. Every query is written once with placeholders, and rendered
with Grafana's variables (``$cluster``, ``$__rate_interval``) or the workbook's parameters
(``{cluster}``). tests/deploy/test_dashboards.py parses each one with a real Prometheus
server and evaluates it against a running agent. Edit this file, not the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = DEPLOY / "dashboards"
WORKBOOK_PATH = DEPLOY / "azure" / "workbook.json"

# --- query templates -----------------------------------------------------------------------
# Placeholders, replaced per target:
#   @CL@   the cluster matcher            @NODE@  cluster and node
#   @SNS@  source namespace               @SWL@   source namespace and workload
#   @DNS@  destination namespace          @DWL@   destination namespace and workload
#   @CNS@  service-graph client namespace @SVNS@  service-graph server namespace
#   @RATE@ the rate window

GRAFANA_FILL = {
    "@CL@": 'cluster=~"$cluster"',
    "@NODE@": 'cluster=~"$cluster", instance=~"$node"',
    "@SNS@": 'cluster=~"$cluster", source_namespace=~"$namespace"',
    "@SWL@": 'cluster=~"$cluster", source_namespace=~"$namespace", source_workload=~"$workload"',
    "@DNS@": 'cluster=~"$cluster", destination_namespace=~"$namespace"',
    "@DWL@": 'cluster=~"$cluster", destination_namespace=~"$namespace", destination_workload=~"$workload"',
    "@CNS@": 'cluster=~"$cluster", client_namespace=~"$namespace"',
    "@SVNS@": 'cluster=~"$cluster", server_namespace=~"$namespace"',
    "@RATE@": "$__rate_interval",
}

# Workbook parameters are regular expressions, ".*" meaning all (the default). The workbook
# has no node parameter: its node panels split by node instead.
WORKBOOK_FILL = {
    "@CL@": 'cluster=~"{cluster}"',
    "@NODE@": 'cluster=~"{cluster}"',
    "@SNS@": 'cluster=~"{cluster}", source_namespace=~"{namespace}"',
    "@SWL@": 'cluster=~"{cluster}", source_namespace=~"{namespace}", source_workload=~"{workload}"',
    "@DNS@": 'cluster=~"{cluster}", destination_namespace=~"{namespace}"',
    "@DWL@": 'cluster=~"{cluster}", destination_namespace=~"{namespace}", destination_workload=~"{workload}"',
    "@CNS@": 'cluster=~"{cluster}", client_namespace=~"{namespace}"',
    "@SVNS@": 'cluster=~"{cluster}", server_namespace=~"{namespace}"',
    "@RATE@": "5m",
}


def render(template: str, fill: dict[str, str]) -> str:
    for token, value in fill.items():
        template = template.replace(token, value)
    if "@" in template:
        raise ValueError(f"unfilled placeholder in {template!r}")
    return template


def rate(metric: str, matchers: str, by: str = "", extra: str = "") -> str:
    """``sum by (BY) (rate(METRIC{MATCHERS,EXTRA}[@RATE@]))``."""
    sel = matchers + (f", {extra}" if extra else "")
    agg = f"sum by ({by}) " if by else "sum "
    return f"{agg}(rate({metric}{{{sel}}}[@RATE@]))"


def topk(k: int, expr: str) -> str:
    return f"topk({k}, {expr})"


def error_percent(metric: str, matchers: str) -> str:
    """Share of DNS responses whose rcode is not "No Error" (0 when there are none)."""
    errors = rate(metric, matchers, extra='rcode!="No Error"')
    total = rate(metric, matchers)
    return f"100 * ({errors} or vector(0)) / {total}"


def ratio(num_metric: str, den_metric: str, matchers: str, by: str = "") -> str:
    return f"{rate(num_metric, matchers, by)} / {rate(den_metric, matchers, by)}"


# --- panels --------------------------------------------------------------------------------


@dataclass
class Target:
    expr: str  # template
    legend: str = ""
    instant: bool = False
    table: bool = False
    ref: str = ""


@dataclass
class Panel:
    kind: str  # timeseries | stat | table | nodeGraph | row | text
    title: str
    targets: list[Target] = field(default_factory=list)
    unit: str = "short"
    width: int = 12
    height: int = 8
    description: str = ""
    content: str = ""


def ts(title: str, expr: str, legend: str, unit: str = "short", width: int = 12, description: str = "") -> Panel:
    return Panel("timeseries", title, [Target(expr, legend)], unit, width, 8, description)


def stat(title: str, expr: str, unit: str = "short", description: str = "") -> Panel:
    return Panel("stat", title, [Target(expr, instant=True)], unit, 6, 4, description)


def table(title: str, expr: str, unit: str = "short", width: int = 24, description: str = "") -> Panel:
    return Panel("table", title, [Target(expr, table=True, instant=True)], unit, width, 8, description)


def row(title: str) -> Panel:
    return Panel("row", title, width=24, height=1)


@dataclass
class Variable:
    name: str
    label: str
    query: str  # label_values(...) template, Grafana only


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    variables: list[Variable]
    panels: list[Panel]


CLUSTER = Variable("cluster", "Cluster", "label_values(networkobservability_forward_count, cluster)")
NODE = Variable("node", "Node", 'label_values(networkobservability_forward_count{cluster=~"$cluster"}, instance)')


def namespace_var(metric: str, label: str = "source_namespace") -> Variable:
    return Variable("namespace", "Namespace", f'label_values({metric}{{cluster=~"$cluster"}}, {label})')


def workload_var(metric: str) -> Variable:
    return Variable(
        "workload", "Workload",
        f'label_values({metric}{{cluster=~"$cluster", source_namespace=~"$namespace"}}, source_workload)',
    )


# --- the views -----------------------------------------------------------------------------

FWD_B, FWD_C = "networkobservability_forward_bytes", "networkobservability_forward_count"
DROP_B, DROP_C = "networkobservability_drop_bytes", "networkobservability_drop_count"
FLOWS = "hubble_flows_processed_total"
DROPS = "hubble_drop_total"
TCP_FLAGS = "hubble_tcp_flags_total"
DNS_Q, DNS_R, DNS_T = "hubble_dns_queries_total", "hubble_dns_responses_total", "hubble_dns_response_types_total"
SG = "flowtel_service_graph_"


def cluster_overview() -> Dashboard:
    n = "@NODE@"
    return Dashboard(
        "flowtel-clusters", "flowtel / Networking / Clusters",
        "Node-level traffic, drops, TCP and interface health of every node (ACNS's cluster view).",
        [CLUSTER, NODE],
        [
            stat("Forwarded", rate(FWD_B, n), "Bps", "Bytes per second the nodes' interfaces passed."),
            stat("Dropped packets", rate(DROP_C, n), "pps", "Packets the kernel dropped, all reasons."),
            stat("TCP connections established", f'sum(networkobservability_tcp_state{{{n}, state="ESTABLISHED"}})'),
            stat("Lost events", rate("hubble_lost_events_total", "@CL@"), "ops",
                 "Records flowtel could not deliver (ring or queue full): non-zero means missing data."),
            row("Traffic"),
            ts("Bytes forwarded by node", rate(FWD_B, n, "instance, direction"), "{{instance}} {{direction}}", "Bps"),
            ts("Packets forwarded by node", rate(FWD_C, n, "instance, direction"), "{{instance}} {{direction}}", "pps"),
            row("Drops"),
            ts("Dropped packets by reason", rate(DROP_C, n, "reason, direction"), "{{reason}} {{direction}}", "pps"),
            ts("Dropped bytes by node", rate(DROP_B, n, "instance, direction"), "{{instance}} {{direction}}", "Bps"),
            row("TCP"),
            ts("TCP connections by state", f"sum by (state) (networkobservability_tcp_state{{{n}}})", "{{state}}"),
            ts("TCP retransmissions by node", rate("networkobservability_tcp_retransmission_count", n, "instance"),
               "{{instance}}", "ops"),
            ts("TCP statistics (top 10)", topk(10, rate("networkobservability_tcp_connection_stats", n, "statistic_name")),
               "{{statistic_name}}", "ops", 24, "Changes per second of /proc/net/netstat TcpExt and /proc/net/snmp Tcp."),
            row("IP, UDP and interfaces"),
            ts("IP statistics (top 10)", topk(10, rate("networkobservability_ip_connection_stats", n, "statistic_name")),
               "{{statistic_name}}", "ops"),
            ts("UDP statistics", rate("networkobservability_udp_connection_stats", n, "statistic_name"),
               "{{statistic_name}}", "ops"),
            ts("Interface errors and drops (top 10)",
               topk(10, rate("networkobservability_interface_stats", n, "instance, interface_name, statistic_name")),
               "{{instance}} {{interface_name}} {{statistic_name}}", "ops", 24),
            row("DNS (node level)"),
            ts("DNS requests by node", rate("networkobservability_dns_request_count", n, "instance"), "{{instance}}", "reqps"),
            ts("DNS responses by node", rate("networkobservability_dns_response_count", n, "instance"), "{{instance}}",
               "reqps"),
        ],
    )


def dns_panels(q: str, filt: str, per_pod: bool) -> list[Panel]:
    panels = [
        stat("DNS requests", rate(DNS_Q, filt), "reqps"),
        stat("DNS responses", rate(DNS_R, filt), "reqps"),
        stat("Responses with errors", error_percent(DNS_R, filt), "percent",
             "Share of responses whose rcode is not No Error (NXDOMAIN, SERVFAIL, REFUSED, …)."),
        stat("Unanswered queries", rate("flowtel_dns_unanswered_total", "@CL@"), "reqps",
             "Queries with no response within the timeout (flowtel's own, node-wide)."),
        row("Requests and responses"),
        ts("Requests by query type", rate(DNS_Q, filt, "qtypes"), "{{qtypes}}", "reqps"),
        ts("Responses by return code", rate(DNS_R, filt, "rcode"), "{{rcode}}", "reqps"),
        ts("Response record types", rate(DNS_T, filt, "type"), "{{type}}", "reqps"),
        ts("IPs returned per response", rate(DNS_R, filt, "ips_returned"), "{{ips_returned}} IPs", "reqps"),
        row("Names"),
        table("Top queried names", topk(10, rate(DNS_Q, filt, "query")), "reqps", 12),
        table("Top names with errors", topk(10, rate(DNS_R, filt, "query, rcode", 'rcode!="No Error"')), "reqps", 12),
    ]
    if per_pod:
        panels += [
            row("Pods"),
            ts("Requests by pod", rate(DNS_Q, filt, "source_pod"), "{{source_pod}}", "reqps"),
            ts("Errors by pod", rate(DNS_R, filt, "source_pod, rcode", 'rcode!="No Error"'),
               "{{source_pod}} {{rcode}}", "reqps"),
        ]
    else:
        panels += [
            row("Workloads"),
            table("Top workloads by DNS requests", topk(10, rate(DNS_Q, filt, "source_namespace, source_workload")),
                  "reqps", 12),
            table("Top workloads by DNS errors",
                  topk(10, rate(DNS_R, filt, "source_namespace, source_workload, rcode", 'rcode!="No Error"')),
                  "reqps", 12),
            ts("DNS latency (average)", ratio(SG + "dns_latency_seconds_sum", SG + "dns_latency_seconds_count", "@CL@"),
               "average", "s", 12, "Mean time from query to response, from flowtel's service graph."),
            ts("DNS requests by node", rate("networkobservability_dns_request_count", "@CL@", "instance"),
               "{{instance}}", "reqps"),
        ]
    return panels


def dns_cluster() -> Dashboard:
    return Dashboard(
        "flowtel-dns-cluster", "flowtel / Networking / DNS (Cluster)",
        "DNS requests, errors and names across the cluster, from Hubble's DNS metrics.",
        [CLUSTER], dns_panels(DNS_Q, "@CL@", per_pod=False),
    )


def dns_workload() -> Dashboard:
    return Dashboard(
        "flowtel-dns-workload", "flowtel / Networking / DNS (Workload)",
        "DNS requests, errors and names of one workload's pods.",
        [CLUSTER, namespace_var(DNS_Q), workload_var(DNS_Q)], dns_panels(DNS_Q, "@SWL@", per_pod=True),
    )


def drops_workload() -> Dashboard:
    return Dashboard(
        "flowtel-drops-workload", "flowtel / Networking / Drops (Workload)",
        "Packets dropped on their way out of or into one workload's pods, and why.",
        [CLUSTER, namespace_var(FLOWS), workload_var(FLOWS)],
        [
            stat("Outgoing drops", rate(DROPS, "@SWL@"), "pps"),
            stat("Incoming drops", rate(DROPS, "@DWL@"), "pps"),
            stat("Outgoing dropped flows", rate(FLOWS, "@SWL@", extra='verdict="DROPPED"'), "ops"),
            stat("Incoming dropped flows", rate(FLOWS, "@DWL@", extra='verdict="DROPPED"'), "ops"),
            row("Reasons"),
            ts("Outgoing drops by reason", rate(DROPS, "@SWL@", "reason, protocol"), "{{reason}} {{protocol}}", "pps"),
            ts("Incoming drops by reason", rate(DROPS, "@DWL@", "reason, protocol"), "{{reason}} {{protocol}}", "pps"),
            row("Pods"),
            table("Top source pods by drops", topk(10, rate(DROPS, "@SWL@", "source_pod, reason")), "pps", 12),
            table("Top destination pods by drops", topk(10, rate(DROPS, "@DWL@", "destination_pod, reason")), "pps", 12),
            ts("Drops by direction", rate(DROPS, "@SWL@", "traffic_direction"), "{{traffic_direction}}", "pps"),
            ts("Node drops by reason", rate(DROP_C, "@CL@", "reason"), "{{reason}}", "pps"),
        ],
    )


def pod_flow_panels(src: str, dst: str, per: str) -> list[Panel]:
    """Flows out of (src) and into (dst) the selection, split by pod or by workload."""
    src_label, dst_label = f"source_{per}", f"destination_{per}"
    return [
        stat("Outgoing flows", rate(FLOWS, src), "ops"),
        stat("Incoming flows", rate(FLOWS, dst), "ops"),
        stat("Outgoing drops", rate(DROPS, src), "pps"),
        stat("TCP resets sent", rate(TCP_FLAGS, src, extra='flag="RST"'), "ops"),
        row("Flows"),
        ts("Outgoing flows by verdict", rate(FLOWS, src, "verdict"), "{{verdict}}", "ops"),
        ts("Incoming flows by verdict", rate(FLOWS, dst, "verdict"), "{{verdict}}", "ops"),
        ts("Flows by protocol and type", rate(FLOWS, src, "protocol, type, subtype"), "{{protocol}} {{type}} {{subtype}}",
           "ops"),
        ts("Flows by direction", rate(FLOWS, src, "traffic_direction"), "{{traffic_direction}}", "ops"),
        row("Top talkers"),
        table(f"Top {per}s by outgoing flows", topk(10, rate(FLOWS, src, f"source_namespace, {src_label}")), "ops", 12),
        table(f"Top {per}s by incoming flows", topk(10, rate(FLOWS, dst, f"destination_namespace, {dst_label}")),
              "ops", 12),
        table("Traffic between workloads",
              topk(20, rate(FLOWS, src, "source_namespace, source_workload, destination_namespace, destination_workload")),
              "ops", 24),
        row("TCP"),
        ts("TCP flags", rate(TCP_FLAGS, src, "flag, family"), "{{flag}} {{family}}", "ops"),
        ts(f"TCP resets by {per}", rate(TCP_FLAGS, src, src_label, 'flag="RST"'), f"{{{{{src_label}}}}}", "ops"),
        ts(f"Drops by {per}", rate(DROPS, src, f"{src_label}, reason"), f"{{{{{src_label}}}}} {{{{reason}}}}", "pps"),
        ts("Lost events", rate("hubble_lost_events_total", "@CL@", "source"), "{{source}}", "ops"),
    ]


def pod_flows_namespace() -> Dashboard:
    return Dashboard(
        "flowtel-pod-flows-namespace", "flowtel / Networking / Pod Flows (Namespace)",
        "Flows, drops and TCP flags of the pods of a namespace.",
        [CLUSTER, namespace_var(FLOWS)], pod_flow_panels("@SNS@", "@DNS@", "pod"),
    )


def pod_flows_workload() -> Dashboard:
    return Dashboard(
        "flowtel-pod-flows-workload", "flowtel / Networking / Pod Flows (Workload)",
        "Flows, drops and TCP flags of one workload's pods.",
        [CLUSTER, namespace_var(FLOWS), workload_var(FLOWS)], pod_flow_panels("@SWL@", "@DWL@", "pod"),
    )


def edges(metric: str) -> str:
    """Per edge (client -> server), for edges touching the namespace at either end."""
    by = "client_namespace, client, server_namespace, server"
    return (f"sum by ({by}) (rate({metric}{{@CNS@}}[@RATE@]) or rate({metric}{{@SVNS@}}[@RATE@]))")


def node_graph_edges() -> str:
    inner = edges(SG + "request_total")
    return (
        f'label_join(label_join(label_join({inner}, "source", "/", "client_namespace", "client"), '
        f'"target", "/", "server_namespace", "server"), "id", " -> ", "source", "target")'
    )


def node_graph_nodes() -> str:
    inner = edges(SG + "request_total")
    clients = f'label_join(sum by (client_namespace, client) ({inner}), "id", "/", "client_namespace", "client")'
    servers = f'label_join(sum by (server_namespace, server) ({inner}), "id", "/", "server_namespace", "server")'
    # label_join with one source label copies it (no "$1": Grafana would read it as a variable).
    return f'label_join(sum by (id) ({clients} or {servers}), "title", "", "id")'


def edge_table(metric: str) -> str:
    by = "client_namespace, client, server_namespace, server, protocol, port, verdict"
    return f"sum by ({by}) (rate({metric}{{@CNS@}}[@RATE@]) or rate({metric}{{@SVNS@}}[@RATE@]))"


def service_map() -> Dashboard:
    graph = Panel(
        "nodeGraph", "Service map",
        [Target(node_graph_nodes(), table=True, instant=True, ref="nodes"),
         Target(node_graph_edges(), table=True, instant=True, ref="edges")],
        "ops", 24, 14, "Workloads (or pods, IPs and DNS names outside) and the flows between them, per second.",
    )
    return Dashboard(
        "flowtel-service-map", "flowtel / Networking / Service Map",
        "Who talks to whom: edges between workloads from flowtel's servicegraph connector.",
        [CLUSTER, namespace_var(SG + "request_total", "client_namespace")],
        [
            graph,
            table("Edges: flows per second", topk(50, edge_table(SG + "request_total")), "ops"),
            table("Edges: bytes per second", topk(50, edge_table(SG + "bytes_total")), "Bps"),
            table("Edges with drops", topk(50, edge_table(SG + "dropped_total")), "pps", 12),
            ts("DNS latency by server (average)",
               f"{edges(SG + 'dns_latency_seconds_sum')} / {edges(SG + 'dns_latency_seconds_count')}",
               "{{client}} -> {{server}}", "s", 12),
            ts("TCP handshake RTT by edge (average)",
               f"{edges(SG + 'tcp_handshake_rtt_seconds_sum')} / {edges(SG + 'tcp_handshake_rtt_seconds_count')}",
               "{{client}} -> {{server}}", "s", 24),
        ],
    )


DASHBOARDS = (cluster_overview, dns_cluster, dns_workload, drops_workload, pod_flows_namespace, pod_flows_workload,
              service_map)


# --- Grafana JSON ------------------------------------------------------------------------------

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def grafana_variable(v: Variable) -> dict[str, Any]:
    return {
        "name": v.name,
        "label": v.label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": v.query,
        "definition": v.query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        # A regular expression, as every query uses =~: "All" matches series without the
        # label too (e.g. no `cluster` label outside Azure Monitor).
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
    }


def grafana_target(t: Target, ref: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "refId": t.ref or ref,
        "datasource": DATASOURCE,
        "expr": render(t.expr, GRAFANA_FILL),
        "editorMode": "code",
        "range": not t.instant,
        "instant": t.instant,
    }
    if t.legend:
        out["legendFormat"] = t.legend
    if t.table:
        out["format"] = "table"
    return out


def grafana_panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    grid = {"h": p.height, "w": p.width, "x": x, "y": y}
    if p.kind == "row":
        return {"id": pid, "type": "row", "title": p.title, "collapsed": False, "gridPos": grid, "panels": []}
    out: dict[str, Any] = {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "targets": [grafana_target(t, chr(ord("A") + i)) for i, t in enumerate(p.targets)],
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
    }
    if p.description:
        out["description"] = p.description
    if p.kind == "timeseries":
        out["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"], "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
        out["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "fillOpacity": 10, "showPoints": "never"}
    elif p.kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    elif p.kind == "table":
        out["options"] = {"showHeader": True, "sortBy": [{"displayName": "Value", "desc": True}]}
        out["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    elif p.kind == "nodeGraph":
        # Grafana's node graph takes a frame of nodes (id, title, mainstat) and one of edges
        # (id, source, target, mainstat); the queries build those fields with label_join.
        out["options"] = {"nodes": {"mainStatUnit": p.unit}, "edges": {"mainStatUnit": p.unit}}
        out["transformations"] = [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "client": True, "client_namespace": True, "server": True,
                              "server_namespace": True},
            "renameByName": {"Value #nodes": "mainstat", "Value #edges": "mainstat"},
        }}]
    return out


def layout(panels: list[Panel]) -> list[dict[str, Any]]:
    """Left to right, top to bottom, on Grafana's 24-column grid."""
    out, x, y, row_height = [], 0, 0, 0
    for pid, p in enumerate(panels, start=1):
        if p.kind == "row" or x + p.width > 24:
            x, y = 0, y + row_height
            row_height = 0
        out.append(grafana_panel(p, pid, x, y))
        if p.kind == "row":
            y += 1
            continue
        x += p.width
        row_height = max(row_height, p.height)
    return out


def grafana_dashboard(d: Dashboard) -> dict[str, Any]:
    datasource_var = {
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": "",
    }
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": ["flowtel", "networking"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["flowtel"], "asDropdown": True, "title": "flowtel dashboards",
                   "includeVars": True, "keepTime": True}],
        "templating": {"list": [datasource_var, *(grafana_variable(v) for v in d.variables)]},
        "panels": layout(d.panels),
    }


# --- Azure Monitor workbook ---------------------------------------------------------------------

_WB = uuid.UUID("6f1d2c0e-5b8a-4f7e-9c3d-0a1b2c3d4e5f")


def _id(name: str) -> str:
    return str(uuid.uuid5(_WB, name))


def _param(name: str, label: str, ptype: int, **extra: Any) -> dict[str, Any]:
    return {"id": _id(name), "version": "KqlParameterItem/1.0", "name": name, "label": label, "type": ptype, **extra}


def workbook_parameters() -> dict[str, Any]:
    def resource_picker(name: str, label: str, rtype: str) -> dict[str, Any]:
        return _param(
            name, label, 5, isRequired=True,
            query=f"resources\n| where type =~ '{rtype}'\n| project id",
            crossComponentResources=["value::all"],
            typeSettings={"additionalResourceOptions": ["value::1"], "showDefault": False},
            defaultValue="value::1", queryType=1, resourceType="microsoft.resourcegraph/resources",
        )

    def regex(name: str, label: str, description: str) -> dict[str, Any]:
        return _param(name, label, 1, value=".*", description=description, isRequired=True)

    return {
        "type": 9,
        "name": "parameters",
        "content": {
            "version": "KqlParameterItem/1.0",
            "parameters": [
                resource_picker("MonitorWorkspace", "Azure Monitor workspace (managed Prometheus)",
                                "microsoft.monitor/accounts"),
                resource_picker("LogWorkspace", "Log Analytics workspace (flow logs)",
                                "microsoft.operationalinsights/workspaces"),
                _param("TimeRange", "Time range", 4, isRequired=True, value={"durationMs": 3600000},
                       typeSettings={"selectableValues": [{"durationMs": d} for d in
                                                          (900000, 3600000, 14400000, 43200000, 86400000, 604800000)],
                                     "allowCustom": True}),
                regex("cluster", "Cluster (regex)", "The `cluster` label managed Prometheus adds; .* for all."),
                regex("namespace", "Namespace (regex)", "Pod namespace; .* for all."),
                regex("workload", "Workload (regex)", "Deployment, StatefulSet, DaemonSet, … name; .* for all."),
            ],
            "style": "pills",
            "queryType": 0,
            "resourceType": "microsoft.operationalinsights/workspaces",
        },
    }


def promql_item(name: str, title: str, template: str, width: int) -> dict[str, Any]:
    provider = {"version": "PrometheusQueryProvider/1.0", "customEndpoint": False,
                "queryText": render(template, WORKBOOK_FILL), "type": "query_range"}
    return {
        "type": 3,
        "name": name,
        "content": {
            "version": "KqlItem/1.0",
            "title": title,
            "query": json.dumps(provider, separators=(",", ":")),
            "size": 0,
            "timeContextFromParameter": "TimeRange",
            "queryType": 16,
            "resourceType": "microsoft.monitor/accounts",
            "crossComponentResources": ["{MonitorWorkspace}"],
            "visualization": "timechart",
        },
        "customWidth": str(width),
    }


# Flow logs in Log Analytics: the Collector's azuremonitor exporter writes each OTLP log
# record as a row of AppTraces, the Hubble flow JSON in Message, the resource and record
# attributes (k8s.cluster.name when set in OTEL_RESOURCE_ATTRIBUTES) in Properties.
KQL_FLOWS = """AppTraces
| where TimeGenerated {TimeRange}
| where AppRoleName == "flowtel"
| extend flow = parse_json(Message)
| where isnotempty(flow.verdict)
| where tostring(Properties["k8s.cluster.name"]) matches regex "^({cluster})$"
| extend SrcNamespace = tostring(flow.source.namespace), SrcPod = tostring(flow.source.pod_name),
         SrcWorkload = tostring(flow.source.workloads[0].name),
         DstNamespace = tostring(flow.destination.namespace), DstPod = tostring(flow.destination.pod_name),
         DstWorkload = tostring(flow.destination.workloads[0].name),
         Verdict = tostring(flow.verdict),
         DropReason = coalesce(tostring(flow.extensions.value.drop_reason), tostring(flow.drop_reason_desc)),
         Direction = tostring(flow.traffic_direction), Summary = tostring(flow.Summary),
         Query = tostring(flow.l7.dns.query), RCode = toint(flow.l7.dns.rcode),
         Packets = tolong(flow.extensions.value.packets), Bytes = tolong(flow.extensions.value.bytes)
| where (SrcNamespace matches regex "^({namespace})$" and SrcWorkload matches regex "^({workload})$")
     or (DstNamespace matches regex "^({namespace})$" and DstWorkload matches regex "^({workload})$")"""

KQL_QUERIES = [
    ("flowlogs-verdicts", "Flows by verdict", KQL_FLOWS + """
| summarize Flows = count() by bin(TimeGenerated, 5m), Verdict
| order by TimeGenerated asc""", "timechart", 50),
    ("flowlogs-drops", "Dropped flows by reason and workload", KQL_FLOWS + """
| where Verdict == "DROPPED"
| summarize Flows = count(), Packets = sum(Packets) by DropReason, SrcNamespace, SrcWorkload, DstNamespace, DstWorkload
| order by Flows desc
| take 50""", "table", 50),
    ("flowlogs-dns-errors", "DNS errors by name", KQL_FLOWS + """
| where isnotempty(Query) and RCode > 0
| summarize Responses = count() by Query, RCode, SrcNamespace, SrcWorkload
| order by Responses desc
| take 50""", "table", 50),
    ("flowlogs-talkers", "Top talkers (bytes)", KQL_FLOWS + """
| summarize Bytes = sum(Bytes), Packets = sum(Packets) by SrcNamespace, SrcWorkload, DstNamespace, DstWorkload
| order by Bytes desc
| take 50""", "table", 50),
    ("flowlogs-recent", "Recent flows", KQL_FLOWS + """
| project TimeGenerated, Verdict, Direction, SrcNamespace, SrcPod, DstNamespace, DstPod, Summary, DropReason
| order by TimeGenerated desc
| take 200""", "table", 100),
]


def kql_item(name: str, title: str, query: str, visualization: str, width: int) -> dict[str, Any]:
    return {
        "type": 3,
        "name": name,
        "content": {
            "version": "KqlItem/1.0",
            "title": title,
            "query": query,
            "size": 0,
            "timeContextFromParameter": "TimeRange",
            "queryType": 0,
            "resourceType": "microsoft.operationalinsights/workspaces",
            "crossComponentResources": ["{LogWorkspace}"],
            "visualization": visualization,
        },
        "customWidth": str(width),
    }


def markdown(name: str, text: str) -> dict[str, Any]:
    return {"type": 1, "name": name, "content": {"json": text}}


def workbook() -> dict[str, Any]:
    items: list[dict[str, Any]] = [
        markdown("title", "# flowtel network observability\n\nNode and pod network metrics from Azure Monitor "
                 "managed Prometheus (PromQL, flowtel's ACNS-compatible names) and flow logs from Log Analytics "
                 "(KQL). Parameters are regular expressions; `.*` selects all."),
        workbook_parameters(),
    ]
    for build in DASHBOARDS:
        d = build()
        items.append(markdown(f"{d.uid}-heading", f"## {d.title.split(' / ')[-1]}\n\n{d.description}"))
        for i, p in enumerate(d.panels):
            if p.kind in ("row", "text", "nodeGraph"):
                continue
            for j, t in enumerate(p.targets):
                width = 50 if p.width < 24 else 100
                items.append(promql_item(f"{d.uid}-{i}-{j}", p.title, t.expr, width))
    items.append(markdown("flowlogs-heading", "## Flow logs\n\nFrom the Collector's `azuremonitor` exporter "
                          "(`AppTraces`, the Hubble flow JSON in `Message`)."))
    items += [kql_item(*q) for q in KQL_QUERIES]
    return {
        "version": "Notebook/1.0",
        "items": items,
        "isLocked": False,
        "fallbackResourceIds": ["Azure Monitor"],
        "$schema": "https://github.com/Microsoft/Application-Insights-Workbooks/blob/master/schema/workbook.json",
    }


# --- output ---------------------------------------------------------------------------------------


def outputs() -> dict[Path, str]:
    files = {}
    for build in DASHBOARDS:
        d = build()
        files[DASHBOARD_DIR / f"{d.uid}.json"] = json.dumps(grafana_dashboard(d), indent=2) + "\n"
    files[WORKBOOK_PATH] = json.dumps(workbook(), indent=2) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run python deploy/dashboards/generate.py):", *map(str, stale), sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
