// flowtel web UI: the service map (GET /api/map) and a live flow table (GET /api/flows).
// Plain DOM and SVG, no libraries, nothing loaded from outside the agent. Every string
// from the network goes through textContent, never innerHTML: DNS names are user data.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 2000;
const TABLE_ROWS = 200;
const NODE_W = 180, NODE_H = 44, COL_W = 320, ROW_H = 90, PAD = 30, BACK_ARC = 50;

const $ = (id) => document.getElementById(id);
// namespace and filter are what the page applies; pending is what a link asked for and
// the user has not applied yet (see readHash).
const state = { namespace: "", filter: "", pending: null, map: null, selected: null, timer: null };

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function td(text, cls) {
  const cell = document.createElement("td");
  cell.textContent = text;
  if (cls) cell.className = cls;
  return cell;
}

// The filter box takes `flowtel observe` flags; they become the API's ordered query.
function filterParams(text) {
  const tokens = text.match(/"[^"]*"|'[^']*'|\S+/g) || [];
  const params = [];
  for (let i = 0; i < tokens.length; i++) {
    let tok = tokens[i];
    if (!tok.startsWith("--")) throw new Error(`expected a --flag, got ${tok}`);
    tok = tok.slice(2);
    if (tok === "not") { params.push(["not", ""]); continue; }
    let value;
    const eq = tok.indexOf("=");
    if (eq >= 0) { value = tok.slice(eq + 1); tok = tok.slice(0, eq); }
    else {
      value = tokens[++i];
      if (value === undefined) throw new Error(`--${tok} needs a value`);
    }
    params.push([tok, value.replace(/^["']|["']$/g, "")]);
  }
  return params;
}

async function getJSON(url) {
  const resp = await fetch(url, { cache: "no-store" });
  const text = await resp.text();
  if (!resp.ok) {
    let message = text;
    try { message = JSON.parse(text).error; } catch (e) { /* not JSON: show the text */ }
    throw new Error(message);
  }
  return text;
}

// --- the service map ---------------------------------------------------------------

function ranks(nodes, pairs) {
  // Longest path from the clients, over the graph without its back edges (found by a DFS
  // that starts from the nodes that call most and are called least), so request chains
  // read left to right and a cycle is cut where it returns to its caller.
  const out = new Map(nodes.map((n) => [n.id, []]));
  const balance = new Map(nodes.map((n) => [n.id, 0]));  // calls made minus calls received
  for (const p of pairs) {
    if (p.client === p.server || out.get(p.client).includes(p.server)) continue;
    out.get(p.client).push(p.server);
    balance.set(p.client, balance.get(p.client) + 1);
    balance.set(p.server, balance.get(p.server) - 1);
  }
  const order = [...nodes].sort((a, b) => balance.get(b.id) - balance.get(a.id) || a.id.localeCompare(b.id));
  const seen = new Map(), forward = new Map(nodes.map((n) => [n.id, []]));
  const visit = (id) => {
    seen.set(id, 1);
    for (const next of out.get(id)) {
      if (seen.get(next) === 1) continue;  // a back edge: a reply path or a cycle
      forward.get(id).push(next);
      if (!seen.has(next)) visit(next);
    }
    seen.set(id, 2);
  };
  for (const n of order) if (!seen.has(n.id)) visit(n.id);
  const rank = new Map();
  const depth = (id) => {
    if (rank.has(id)) return rank.get(id);
    rank.set(id, 0);
    let r = 0;
    for (const [from, tos] of forward) if (tos.includes(id)) r = Math.max(r, depth(from) + 1);
    rank.set(id, r);
    return r;
  };
  for (const n of nodes) depth(n.id);
  return rank;
}

// Arcs under the boxes get deeper the more columns they span, so they do not overlap.
function arcDepth(a, b) { return BACK_ARC * (0.6 + 0.4 * Math.round(Math.abs(b.x - a.x) / COL_W)); }

function layout(nodes, pairs) {
  const rank = ranks(nodes, pairs);
  const columns = [];
  for (const n of [...nodes].sort((a, b) => a.id.localeCompare(b.id))) {
    const r = rank.get(n.id);
    (columns[r] = columns[r] || []).push(n);
  }
  // Room above and below the rows for the arcs of back and column-skipping edges.
  const deepest = BACK_ARC * (0.6 + 0.4 * columns.length);
  const top = PAD + deepest * 0.6;
  // Order each column by where its callers sit, so edges cross less.
  const pos = new Map();
  columns.forEach((col, r) => {
    if (r > 0) {
      const y = (n) => {
        const ys = pairs.filter((p) => p.server === n.id && pos.has(p.client)).map((p) => pos.get(p.client).y);
        return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : Infinity;
      };
      col.sort((a, b) => y(a) - y(b));
    }
    col.forEach((n, i) => pos.set(n.id, { x: PAD + r * COL_W, y: top + i * ROW_H }));
  });
  const rows = Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
  return { pos, width: PAD * 2 + (columns.length - 1) * COL_W + NODE_W, height: top + rows * ROW_H + deepest };
}

function groupEdges(edges) {
  // One drawn line per (client, server, dropped?): a dropped dependency stays visible
  // beside the allowed traffic between the same two workloads.
  const pairs = new Map();
  for (const e of edges) {
    const dropped = e.verdict === "DROPPED";
    const key = `${e.client}\u0000${e.server}\u0000${dropped}`;
    if (!pairs.has(key)) pairs.set(key, { client: e.client, server: e.server, dropped, edges: [] });
    pairs.get(key).edges.push(e);
  }
  return [...pairs.values()];
}

function edgeText(p) {
  const protos = [...new Set(p.edges.map((e) => (e.port ? `${e.protocol}/${e.port}` : e.protocol)))];
  const flows = p.edges.reduce((s, e) => s + e.flows, 0);
  return `${protos.join(", ")} · ${flows} flows${p.dropped ? " · DROPPED" : ""}`;
}

function drawMap(graph) {
  const svg = $("map");
  svg.replaceChildren();
  const defs = el("defs");
  for (const [id, color] of [["arrow", "#64748b"], ["arrow-drop", "#dc2626"]]) {
    const m = el("marker", { id, viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "8", markerHeight: "8", orient: "auto-start-reverse" });
    m.appendChild(el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: color }));
    defs.appendChild(m);
  }
  svg.appendChild(defs);
  const pairs = groupEdges(graph.edges);
  const { pos, width, height } = layout(graph.nodes, pairs);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  if (!graph.nodes.length) {
    svg.appendChild(el("text", { x: PAD, y: PAD + 20, class: "empty" }, "no traffic seen yet"));
    return;
  }
  const edgeLayer = el("g", { class: "edges" });
  const nodeLayer = el("g", { class: "nodes" });
  svg.appendChild(edgeLayer);
  svg.appendChild(nodeLayer);
  for (const p of pairs) {
    if (p.client === p.server) continue;
    const a = pos.get(p.client), b = pos.get(p.server);
    const off = p.dropped ? 8 : 0;  // a dropped line runs just beside its forwarded twin
    let d, lx, ly;
    if (b.x > a.x && b.x - a.x <= COL_W) {  // to the next column: right side to left side
      const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2 + off, x2 = b.x, y2 = b.y + NODE_H / 2 + off;
      const bend = Math.max(60, (x2 - x1) / 2);
      d = `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}`;
      // A dropped line's label goes under it, its forwarded twin's over it: never on top.
      [lx, ly] = [(x1 + x2) / 2, (y1 + y2) / 2 + (p.dropped ? 12 : -6)];
    } else if (b.x > a.x) {  // across columns: under the boxes, bottom to bottom
      const x1 = a.x + NODE_W / 2 + off, y1 = a.y + NODE_H, x2 = b.x + NODE_W / 2 + off, y2 = b.y + NODE_H;
      const low = Math.max(y1, y2) + arcDepth(a, b);
      d = `M ${x1} ${y1} C ${x1} ${low}, ${x2} ${low}, ${x2} ${y2}`;
      [lx, ly] = [(x1 + x2) / 2, low + (p.dropped ? 14 : -8)];  // dropped: outside the arc
    } else {  // back to an earlier column or within one: over the boxes, top to top
      const x1 = a.x + NODE_W / 2 + off, y1 = a.y, x2 = b.x + NODE_W / 2 + off, y2 = b.y;
      const high = Math.min(y1, y2) - arcDepth(a, b);
      d = `M ${x1} ${y1} C ${x1} ${high}, ${x2} ${high}, ${x2} ${y2}`;
      [lx, ly] = [(x1 + x2) / 2, high + (p.dropped ? -6 : 18)];  // dropped: outside the arc
    }
    const cls = p.dropped ? "edge dropped" : "edge";
    const path = el("path", { d, class: cls, "data-client": p.client, "data-server": p.server,
      "data-verdict": p.dropped ? "DROPPED" : "FORWARDED", "marker-end": `url(#${p.dropped ? "arrow-drop" : "arrow"})` });
    path.appendChild(el("title", {}, `${p.client} → ${p.server}: ${edgeText(p)}`));
    const label = el("text", { x: lx, y: ly, "text-anchor": "middle",
      class: p.dropped ? "edge-label dropped" : "edge-label" }, edgeText(p));
    for (const item of [path, label]) item.addEventListener("click", () => showDetails(p));
    edgeLayer.appendChild(path);
    edgeLayer.appendChild(label);
  }
  for (const n of graph.nodes) {
    const { x, y } = pos.get(n.id);
    const g = el("g", { class: `node kind-${n.kind}`, "data-id": n.id, transform: `translate(${x},${y})` });
    g.appendChild(el("rect", { width: NODE_W, height: NODE_H, rx: 6 }));
    g.appendChild(el("text", { x: 10, y: n.namespace ? 19 : 27, class: "name" }, n.name));
    if (n.namespace) g.appendChild(el("text", { x: 10, y: 35, class: "ns" }, n.namespace));
    g.appendChild(el("title", {}, `${n.id} (${n.kind})`));
    nodeLayer.appendChild(g);
  }
}

function ms(seconds) { return `${(seconds * 1000).toFixed(2)} ms`; }

function showDetails(p) {
  state.selected = { client: p.client, server: p.server, dropped: p.dropped };
  writeHash();
  $("details").hidden = false;
  $("details-title").textContent = `${p.client} → ${p.server}`;
  const body = $("details-table").tBodies[0];
  body.replaceChildren();
  for (const e of p.edges) {
    const row = document.createElement("tr");
    if (e.verdict === "DROPPED") row.className = "dropped";
    const dns = e.dns_latency_seconds, rtt = e.tcp_handshake_rtt_seconds;
    row.append(
      td(e.port ? `${e.protocol}/${e.port}` : e.protocol), td(e.verdict, "verdict"), td(String(e.flows)),
      td(String(e.bytes)), td(String(e.dropped)),
      td(dns.count ? `${ms(dns.sum / dns.count)} (${dns.count})` : "–"),
      td(rtt.count ? `${ms(rtt.sum / rtt.count)} (${rtt.count})` : "–"),
      td(e.last_seen));
    body.appendChild(row);
  }
}

function refreshDetails(graph) {
  const sel = state.selected;
  if (!sel) return;
  const p = groupEdges(graph.edges).find((q) => q.client === sel.client && q.server === sel.server && q.dropped === sel.dropped);
  if (p) showDetails(p);
  else $("details").hidden = true;
}

function updateNamespaces(namespaces) {
  const select = $("namespace");
  // A namespace asked for in the URL stays selectable before any of its traffic is seen.
  const wanted = state.namespace && !namespaces.includes(state.namespace) ? [...namespaces, state.namespace] : namespaces;
  const have = [...select.options].map((o) => o.value).filter((v) => v);
  if (have.join("\n") !== wanted.join("\n")) {
    select.replaceChildren(new Option("all namespaces", ""));
    for (const ns of wanted) select.appendChild(new Option(ns, ns));
  }
  select.value = state.namespace;
}

// The view lives in the URL fragment (#namespace=…&filter=…&edge=client,server,VERDICT), so
// a view can be linked to and survives a reload. A namespace or filter from a link is only
// offered, never run: anyone can send a link (or frame the page), and a filter makes the
// agent work for every flow it holds. The user applies it with a click (or by typing it).
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  const wanted = { namespace: h.get("namespace") || "", filter: h.get("filter") || "" };
  const edge = (h.get("edge") || "").split(",");
  state.selected = edge.length === 3 ? { client: edge[0], server: edge[1], dropped: edge[2] === "DROPPED" } : null;
  state.pending = wanted.namespace !== state.namespace || wanted.filter !== state.filter ? wanted : null;
  showPending();
}

function showPending() {
  const p = state.pending;
  $("pending").hidden = !p;
  if (!p) return;
  const parts = [];
  if (p.namespace !== state.namespace) parts.push(p.namespace ? `namespace ${p.namespace}` : "all namespaces");
  if (p.filter !== state.filter) parts.push(p.filter ? `filter ${p.filter}` : "no filter");
  $("pending-text").textContent = parts.join(", ");
}

function applyPending() {
  const p = state.pending;
  if (!p) return;
  state.namespace = p.namespace;
  state.filter = p.filter;
  $("filter").value = state.filter;
  state.pending = null;
  showPending();
  writeHash();
  refresh();
}

function ignorePending() {
  state.pending = null;
  showPending();
  writeHash();
}

function writeHash() {
  const h = new URLSearchParams();
  if (state.namespace) h.set("namespace", state.namespace);
  if (state.filter) h.set("filter", state.filter);
  const sel = state.selected;
  if (sel) h.set("edge", [sel.client, sel.server, sel.dropped ? "DROPPED" : "FORWARDED"].join(","));
  const text = h.toString();
  history.replaceState(null, "", text ? `#${text}` : location.pathname);
}

// --- the flow table ----------------------------------------------------------------

function host(ep, ip, names, port) {
  let h = ip || "N/A";
  if (ep && ep.pod_name) h = ep.namespace ? `${ep.namespace}/${ep.pod_name}` : ep.pod_name;
  else if (names && names.length) h = names.join(",");
  return port ? `${h.includes(":") ? `[${h}]` : h}:${port}` : h;
}

function ports(f) {
  const l4 = f.l4 || {};
  const p = l4.TCP || l4.UDP || l4.SCTP;
  return p ? [p.source_port, p.destination_port] : [undefined, undefined];
}

function flowType(f) {
  if (f.l7) return `${f.l7.dns ? "dns" : "l7"}-${(f.l7.type || "unknown").toLowerCase()}`;
  if (f.verdict === "DROPPED") return f.drop_reason_desc || "UNKNOWN";
  if (f.extensions && f.extensions.tcp_event) return `tcp-${f.extensions.tcp_event}`;
  if (f.traffic_direction === "INGRESS") return "to-endpoint";
  if (f.traffic_direction === "EGRESS") return "from-endpoint";
  return "UNKNOWN";
}

function stamp(rfc3339) {
  const d = new Date(rfc3339);
  return isNaN(d) ? rfc3339 : d.toISOString().slice(11, 23);
}

// RFC 3339 with 0 to 9 fractional digits, padded to 9 so that text order is time order.
function timeKey(t) {
  return t.replace(/:(\d{2})(?:\.(\d+))?Z$/, (_, sec, frac) => `:${sec}.${(frac || "").padEnd(9, "0")}Z`);
}

// view: the namespace and filter these lines were asked for (state may have moved on since).
function drawFlows(lines, view) {
  const body = $("flows").tBodies[0];
  const rows = [];
  // Newest first by flow time: records reach the ring per drain, not in time order.
  const envs = lines.slice(-TABLE_ROWS).map((line, i) => [JSON.parse(line), i]);
  envs.sort(([a, i], [b, j]) => timeKey(b.time).localeCompare(timeKey(a.time)) || j - i);
  for (const [env] of envs) {
    const row = document.createElement("tr");
    if (env.lost_events) {
      row.className = "lost";
      const message = td(`EVENTS LOST: ${env.lost_events.source} ${env.lost_events.num_events_lost}`);
      message.colSpan = 5;
      row.append(td(stamp(env.time)), message);
      rows.push(row);
      continue;
    }
    const f = env.flow;
    const [sport, dport] = ports(f);
    const ip = f.IP || {};
    row.className = f.verdict === "DROPPED" ? "flow dropped" : "flow";
    row.append(td(stamp(f.time)), td(host(f.source, ip.source, f.source_names, sport)),
      td(host(f.destination, ip.destination, f.destination_names, dport)), td(flowType(f)),
      td(f.verdict, "verdict"), td(f.Summary || "", "summary"));
    rows.push(row);
  }
  body.replaceChildren(...rows);
  const shown = [`${rows.length} newest`];
  if (view.namespace) shown.push(`namespace ${view.namespace}`);
  if (view.filter) shown.push(`filter ${view.filter}`);
  $("flow-count").textContent = `(${shown.join(", ")})`;
}

// --- refresh loop ------------------------------------------------------------------

async function refresh() {
  const status = $("status");
  try {
    const view = { namespace: state.namespace, filter: state.filter };
    const params = new URLSearchParams([["last", String(TABLE_ROWS)], ...filterParams(view.filter)]);
    if (view.namespace) params.append("namespace", view.namespace);
    const mapQuery = view.namespace ? `?namespace=${encodeURIComponent(view.namespace)}` : "";
    const [mapText, flowText] = await Promise.all([getJSON(`api/map${mapQuery}`), getJSON(`api/flows?${params}`)]);
    const graph = JSON.parse(mapText);
    state.map = graph;
    updateNamespaces(graph.namespaces);
    drawMap(graph);
    refreshDetails(graph);
    drawFlows(flowText.split("\n").filter((l) => l), view);
    $("error").hidden = true;
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    $("error").hidden = false;
    $("error").textContent = String(err.message || err);
    status.textContent = "error";
  }
}

function schedule() {
  clearTimeout(state.timer);
  if ($("live").checked) state.timer = setTimeout(async () => { await refresh(); schedule(); }, REFRESH_MS);
}

$("namespace").addEventListener("change", (e) => { state.namespace = e.target.value; state.pending = null; showPending(); writeHash(); refresh(); });
$("filter").addEventListener("change", (e) => { state.filter = e.target.value; state.pending = null; showPending(); writeHash(); refresh(); });
$("pending-apply").addEventListener("click", applyPending);
$("pending-ignore").addEventListener("click", ignorePending);
$("live").addEventListener("change", schedule);
$("details-close").addEventListener("click", () => { state.selected = null; $("details").hidden = true; writeHash(); });
window.addEventListener("hashchange", () => { readHash(); refresh(); });
readHash();
refresh().then(schedule);
