"""Text renderings of the service map JSON (``GET /map``) for ``flowtel map -o dot|mermaid``.

They work from the JSON, not the model, because ``flowtel map`` gets the graph from a
running agent. Dropped traffic is drawn red and dashed in both, as in the web UI, so a
denied dependency stands out from an allowed one.
"""
from __future__ import annotations

from typing import Any, Mapping


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def edge_label(edge: Mapping[str, Any]) -> str:
    """``TCP/8080 FORWARDED: 3 flows, 1.2 kB`` plus latency/RTT/drops where there are any."""
    proto = f"{edge['protocol']}/{edge['port']}" if edge.get("port") else edge["protocol"]
    parts = [f"{edge['flows']} flows"]
    if edge.get("bytes"):
        parts.append(human_bytes(edge["bytes"]))
    if edge.get("dropped"):
        parts.append(f"{edge['dropped']} dropped")
    dns = edge.get("dns_latency_seconds") or {}
    if dns.get("count"):
        parts.append(f"dns {dns['sum'] / dns['count'] * 1000:.1f} ms")
    rtt = edge.get("tcp_handshake_rtt_seconds") or {}
    if rtt.get("count"):
        parts.append(f"rtt {rtt['sum'] / rtt['count'] * 1000:.2f} ms")
    return f"{proto} {edge['verdict']}: {', '.join(parts)}"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Mapping[str, Any]) -> str:
    """Graphviz: nodes by id, labelled ``name`` over ``namespace``; one arrow per edge."""
    lines = ["digraph flowtel {", "  rankdir=LR;", '  node [shape=box, style=rounded, fontname="sans-serif"];',
             '  edge [fontname="sans-serif", fontsize=10];']
    for node in graph.get("nodes", ()):
        label = f"{node['name']}\n{node['namespace']}" if node.get("namespace") else node["name"]
        lines.append(f"  {_dot_quote(node['id'])} [label={_dot_quote(label)}, tooltip={_dot_quote(node['kind'])}];")
    for edge in graph.get("edges", ()):
        attrs = [f"label={_dot_quote(edge_label(edge))}"]
        if edge["verdict"] == "DROPPED" or edge.get("dropped"):
            attrs += ["color=red", "fontcolor=red", "style=dashed"]
        lines.append(f"  {_dot_quote(edge['client'])} -> {_dot_quote(edge['server'])} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_text(text: str) -> str:
    # Mermaid strings cannot hold a raw double quote; #quot; is its entity for one.
    return text.replace('"', "#quot;")


def to_mermaid(graph: Mapping[str, Any]) -> str:
    """A Mermaid ``flowchart LR``; node ids are generated because Mermaid ids cannot hold ``/``."""
    lines = ["flowchart LR"]
    ids: dict[str, str] = {}
    for i, node in enumerate(graph.get("nodes", ())):
        ids[node["id"]] = f"n{i}"
        label = f"{node['name']}<br/>{node['namespace']}" if node.get("namespace") else node["name"]
        lines.append(f'  n{i}["{_mermaid_text(label)}"]')
    dropped_links = []
    for i, edge in enumerate(graph.get("edges", ())):
        dropped = edge["verdict"] == "DROPPED" or bool(edge.get("dropped"))
        arrow = "-.->" if dropped else "-->"
        lines.append(f'  {ids[edge["client"]]} {arrow}|"{_mermaid_text(edge_label(edge))}"| {ids[edge["server"]]}')
        if dropped:
            dropped_links.append(str(i))
    if dropped_links:
        lines.append(f"  linkStyle {','.join(dropped_links)} stroke:red,color:red")
    return "\n".join(lines) + "\n"
