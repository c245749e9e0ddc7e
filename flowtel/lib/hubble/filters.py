"""Hubble's flow filters over Cilium's wire messages: the one filter implementation.

Every reader of flows applies these: the ``hubble`` extension's ``GetFlows`` (for Hubble
CLI, Relay, UI and ``flowtel observe``), the HTTP view of the same store, ``flowtel
observe --input-file`` and the flow-log exporters' allow/deny lists. Input is Cilium's
``flow.FlowFilter``; the semantics and validation rules are Hubble's
(cilium ``pkg/hubble/filters``):

- A flow passes when it matches any whitelist filter (or the whitelist is empty) and no
  blacklist filter. Within one filter every non-empty field must match (AND); within one
  field any value may match (OR).
- Pods and services are ``[namespace/][name-prefix]``; a bare name is in ``default``,
  ``ns/`` is any pod of ``ns``. IPs are exact addresses or CIDRs. Ports are 0-65535 on
  TCP, UDP or SCTP. FQDN patterns take ``*`` (any run of ``[-a-zA-Z0-9_.]``) and match
  ``source_names``/``destination_names``, case-insensitively, a trailing dot ignored.
  Node names are ``[cluster/]node`` patterns (a flow's node without a cluster is in
  ``default``). ``dns_query``, ``http_path`` and ``http_url`` are regular expressions
  with Go's (RE2) syntax and semantics.
- ``reply`` matches flows whose direction is known (``is_reply`` set); a drop with an
  unknown direction counts as not a reply, as in Hubble (older Hubble UIs filter drops
  with ``reply: [false]``).
- Lost-events responses always pass: whoever watches a filtered stream must still learn
  that flows were missed (Hubble does the same).

Everything a client sends is hostile: matching is linear-time (RE2, compiled with a
memory bound; literal prefix and set lookups elsewhere), and the number of filters, values
and pattern sizes are bounded. What cannot be compiled raises :class:`FilterError`, whose
message the server returns as ``INVALID_ARGUMENT``; a filter flowtel cannot evaluate
(a CEL expression) is refused the same way rather than ignored.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import re2

from flowtel.labelselector import Requirement, parse_labels, parse_selector, selector_matches
from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.api.observer import observer_pb2

# Bounds on what one request may ask for. Hubble CLI sends a handful of filters with a
# few values each; these leave room for generated filters and stop a request that would
# make every flow cost milliseconds.
MAX_FILTERS = 64  # per whitelist or blacklist
MAX_VALUES = 256  # per field of one filter
MAX_PATTERN = 1024  # characters of one pattern, selector or name
MAX_REGEX = 4096  # characters of one regular expression (RE2: linear in it and in the text)
_REGEX_FIELDS = frozenset({"dns_query", "http_path", "http_url"})
# RE2's memory budget for one compiled expression (the DFA falls back to slower, still
# linear, matching beyond it rather than failing).
_RE2_MAX_MEM = 8 << 20

DEFAULT_CLUSTER = "default"  # Cilium's default cluster name, for node-name patterns
PROTOCOLS = ("tcp", "udp", "sctp", "icmp", "icmpv4", "icmpv6", "dns", "http", "kafka")

Flow = flow_pb2.Flow
Predicate = Callable[[Flow], bool]


class FilterError(ValueError):
    """A filter that cannot be used; the message names the field and the value."""


def _re2(pattern: str, what: str) -> "re2._Regexp":
    options = re2.Options()
    options.max_mem = _RE2_MAX_MEM
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        raise FilterError(f"{what}: invalid regular expression {pattern!r}: {exc}") from None


def _bounded(field: str, values: Sequence[object]) -> None:
    if len(values) > MAX_VALUES:
        raise FilterError(f"{field}: {len(values)} values, at most {MAX_VALUES} are accepted in one filter")
    limit = MAX_REGEX if field in _REGEX_FIELDS else MAX_PATTERN
    for v in values:
        if isinstance(v, str) and len(v) > limit:
            raise FilterError(f"{field}: a value of {len(v)} characters, at most {limit} are accepted")


# --- pods, services ---------------------------------------------------------------------


def parse_namespaced_name(value: str) -> tuple[str, str]:
    """Hubble's ``[namespace/][name]``: a bare name is in ``default``; ``("", "")`` if empty."""
    parts = value.split("/")
    if len(parts) > 1:
        return parts[0], parts[1]
    if not parts[0]:
        return "", ""
    return "default", parts[0]


def _namespaced(field: str, values: Sequence[str],
                get: Callable[[Flow], tuple[str, str]]) -> Predicate:
    rules: list[tuple[str, str]] = []
    for value in values:
        ns, prefix = parse_namespaced_name(value)
        if not ns and not prefix:
            raise FilterError(f"{field}: invalid filter, must be [namespace/][<name>], got {value!r}")
        rules.append((ns, prefix))

    def pred(flow: Flow) -> bool:
        ns, name = get(flow)
        if not ns and not name:
            return False
        return any(ns == r_ns and name.startswith(r_prefix) for r_ns, r_prefix in rules)

    return pred


# --- addresses and ports ----------------------------------------------------------------


def _ips(field: str, values: Sequence[str], get: Callable[[Flow], str]) -> Predicate:
    exact: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for value in values:
        try:
            if "/" in value:
                nets.append(ipaddress.ip_network(value, strict=False))
            else:
                exact.add(ipaddress.ip_address(value))
        except ValueError:
            kind = "CIDR" if "/" in value else "IP address"
            raise FilterError(f"{field}: invalid {kind} in filter: {value!r}") from None

    def pred(flow: Flow) -> bool:
        text = get(flow)
        if not text:
            return False
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return False
        return addr in exact or any(addr in net for net in nets)

    return pred


def parse_ports(field: str, values: Sequence[str]) -> frozenset[int]:
    ports = set()
    for value in values:
        if not value.isdigit() or not value.isascii() or int(value) > 65535:
            raise FilterError(f"{field}: invalid port filter {value!r}: expected a number 0-65535")
        ports.add(int(value))
    return frozenset(ports)


def _l4_ports(flow: Flow) -> tuple[int, int] | None:
    l4 = flow.l4
    which = l4.WhichOneof("protocol")
    if which in ("TCP", "UDP", "SCTP"):
        p = getattr(l4, which)
        return p.source_port, p.destination_port
    return None


# --- names ------------------------------------------------------------------------------


_FQDN_VALID = re2.compile(r"^[-a-zA-Z0-9_.*]+$")


MAX_FQDN_PATTERN = 256  # longer than any DNS name (253) with room for wildcards


def fqdn_regex(pattern: str) -> str:
    """Hubble's FQDN filter pattern as an anchored RE2 expression (FilterError if invalid)."""
    if len(pattern) > MAX_FQDN_PATTERN:
        raise FilterError(f"FQDN pattern too long: {len(pattern)} characters, at most {MAX_FQDN_PATTERN}")
    p = pattern.strip().lower().removesuffix(".")
    while "**" in p:  # the same pattern, a shorter expression
        p = p.replace("**", "*")
    if not _FQDN_VALID.match(p):
        raise FilterError(
            'invalid FQDN in filter: only alphanumeric ASCII characters, the hyphen "-", "." '
            f'and "*" are allowed: {pattern!r}'
        )
    return "^" + p.replace(".", "[.]").replace("*", "[-a-zA-Z0-9_.]*") + "$"


def _fqdns(field: str, values: Sequence[str], get: Callable[[Flow], Sequence[str]]) -> Predicate:
    try:
        regex = _re2("|".join(f"(?:{fqdn_regex(v)})" for v in values), field)
    except FilterError as exc:
        raise FilterError(f"{field}: {exc}") from None

    def pred(flow: Flow) -> bool:
        return any(regex.search(name.lower().removesuffix(".")) for name in get(flow))

    return pred


def _node_regex(pattern: str) -> str:
    if not pattern:
        raise FilterError("empty pattern")
    parts = pattern.split("/")
    if len(parts) > 2:
        raise FilterError(f"too many slashes in pattern {pattern!r}")
    cluster, node = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
    any_name = r"(?:[-0-9_a-z]+(?:\.[-0-9_a-z]+)*)"
    out = []
    for element in (cluster, node):
        if not element:
            out.append(any_name)
            continue
        canon = element.strip().lower()
        if canon.endswith(".."):
            raise FilterError(f"multiple trailing dots in pattern {pattern!r}")
        canon = canon.removesuffix(".")
        piece = []
        for ch in canon:
            if ch == ".":
                piece.append(r"\.")
            elif ch == "*":
                piece.append("[-.0-9a-z]*")
            elif ch == "-" or ch == "_" or ("0" <= ch <= "9") or ("a" <= ch <= "z"):
                piece.append(ch)
            else:
                raise FilterError(f"{ch!r}: invalid rune in pattern {pattern!r}")
        if not piece:
            raise FilterError("empty pattern")
        out.append("".join(piece))
    return out[0] + "/" + out[1]


def _node_names(values: Sequence[str]) -> Predicate:
    try:
        regex = _re2(r"\A(?:" + "|".join(_node_regex(v) for v in values) + r")\z", "node_name")
    except FilterError as exc:
        raise FilterError(f"node_name: {exc}") from None

    def pred(flow: Flow) -> bool:
        name = flow.node_name
        if not name:
            return False
        if "/" not in name:
            name = f"{DEFAULT_CLUSTER}/{name}"
        return regex.search(name) is not None

    return pred


def _regexes(field: str, values: Sequence[str], get: Callable[[Flow], str | None]) -> Predicate:
    compiled = [_re2(v, field) for v in values]

    def pred(flow: Flow) -> bool:
        text = get(flow)
        return text is not None and any(r.search(text) for r in compiled)

    return pred


# --- labels -----------------------------------------------------------------------------


def _labels(field: str, values: Sequence[str], get: Callable[[Flow], Sequence[str]]) -> Predicate:
    selectors: list[list[Requirement]] = []
    for value in values:
        try:
            selectors.append(parse_selector(value))
        except ValueError as exc:
            raise FilterError(f"{field}: {exc}") from None

    def pred(flow: Flow) -> bool:
        labels = parse_labels(list(get(flow)))
        return any(selector_matches(reqs, labels) for reqs in selectors)

    return pred


# --- enums and the rest -----------------------------------------------------------------


def _protocols(values: Sequence[str]) -> Predicate:
    l4: set[str] = set()
    l7: set[str] = set()
    for value in values:
        proto = value.lower()
        if proto == "icmp":
            l4.update(("ICMPv4", "ICMPv6"))
        elif proto in ("icmpv4", "icmpv6"):
            l4.add("ICMPv" + proto[-1])
        elif proto in ("tcp", "udp", "sctp"):
            l4.add(proto.upper())
        elif proto in ("dns", "http", "kafka"):
            l7.add(proto)
        else:
            raise FilterError(f"protocol: unknown protocol: {value!r}; known: {', '.join(PROTOCOLS)}")

    def pred(flow: Flow) -> bool:
        if flow.HasField("l4") and flow.l4.WhichOneof("protocol") in l4:
            return True
        # flowtel's only L7 record is DNS; http and kafka are valid and match nothing.
        return "dns" in l7 and flow.HasField("l7") and flow.l7.WhichOneof("record") == "dns"

    return pred


def _event_types(types: Sequence[flow_pb2.EventTypeFilter]) -> Predicate:
    wanted = [(t.type, t.match_sub_type, t.sub_type) for t in types]

    def pred(flow: Flow) -> bool:
        if not flow.HasField("event_type"):
            return False
        et = flow.event_type
        return any((not t or t == et.type) and (not match_sub or sub == et.sub_type)
                   for t, match_sub, sub in wanted)

    return pred


def _reply(values: Sequence[bool]) -> Predicate:
    wanted = set(values)

    def pred(flow: Flow) -> bool:
        if not flow.HasField("is_reply"):
            if flow.verdict != flow_pb2.DROPPED:
                return False
            return False in wanted
        return flow.is_reply.value in wanted

    return pred


def _tcp_flags(wanted: Sequence[flow_pb2.TCPFlags]) -> Predicate:
    names = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")
    sets = [frozenset(n for n in names if getattr(f, n)) for f in wanted]

    def pred(flow: Flow) -> bool:
        if flow.l4.WhichOneof("protocol") != "TCP" or not flow.l4.TCP.HasField("flags"):
            return False
        have = flow.l4.TCP.flags
        return any(all(getattr(have, n) for n in s) for s in sets)

    return pred


def _workloads(wanted: Sequence[flow_pb2.Workload], source: bool) -> Predicate:
    rules = [(w.name, w.kind) for w in wanted]

    def pred(flow: Flow) -> bool:
        ep = flow.source if source else flow.destination
        return any((not name or name == w.name) and (not kind or kind == w.kind)
                   for w in ep.workloads for name, kind in rules)

    return pred


def _interfaces(wanted: Sequence[flow_pb2.NetworkInterface]) -> Predicate:
    rules = [(i.index, i.name) for i in wanted]

    def pred(flow: Flow) -> bool:
        if not flow.HasField("interface"):
            return False
        iface = flow.interface
        return any((not idx or idx == iface.index) and (not name or name == iface.name) for idx, name in rules)

    return pred


_HTTP_CODE = re2.compile(r"^[1-5][0-9]{0,2}\+?$")


def _http_codes(values: Sequence[str]) -> Predicate:
    for value in values:
        if not _HTTP_CODE.match(value) or (not value.endswith("+") and len(value) != 3):
            raise FilterError(f"http_status_code: invalid status code {value!r}: expected e.g. 404 or 5+")
    return _never


def _never(flow: Flow) -> bool:
    # Fields about records flowtel does not produce (HTTP, trace contexts, IP trace IDs):
    # valid filters that no flowtel flow matches, as on a Cilium node without such flows.
    return False


def compile_filter(ff: flow_pb2.FlowFilter) -> list[Predicate]:
    """The predicates a flow must all pass for ``ff``; FilterError for anything invalid."""
    for fd, value in ff.ListFields():
        if fd.is_repeated:
            _bounded(fd.name, value)
    p: list[Predicate] = []
    if ff.uuid:
        uuids = frozenset(ff.uuid)
        p.append(lambda f: f.uuid in uuids)
    if ff.source_ip:
        p.append(_ips("source_ip", ff.source_ip, lambda f: f.IP.source))
    if ff.source_ip_xlated:
        p.append(_ips("source_ip_xlated", ff.source_ip_xlated, lambda f: f.IP.source_xlated))
    if ff.destination_ip:
        p.append(_ips("destination_ip", ff.destination_ip, lambda f: f.IP.destination))
    if ff.source_pod:
        p.append(_namespaced("source_pod", ff.source_pod, lambda f: (f.source.namespace, f.source.pod_name)))
    if ff.destination_pod:
        p.append(_namespaced("destination_pod", ff.destination_pod,
                             lambda f: (f.destination.namespace, f.destination.pod_name)))
    if ff.source_service:
        p.append(_namespaced("source_service", ff.source_service,
                             lambda f: (f.source_service.namespace, f.source_service.name)))
    if ff.destination_service:
        p.append(_namespaced("destination_service", ff.destination_service,
                             lambda f: (f.destination_service.namespace, f.destination_service.name)))
    if ff.source_fqdn:
        p.append(_fqdns("source_fqdn", ff.source_fqdn, lambda f: f.source_names))
    if ff.destination_fqdn:
        p.append(_fqdns("destination_fqdn", ff.destination_fqdn, lambda f: f.destination_names))
    if ff.source_label:
        p.append(_labels("source_label", ff.source_label, lambda f: f.source.labels))
    if ff.destination_label:
        p.append(_labels("destination_label", ff.destination_label, lambda f: f.destination.labels))
    if ff.node_labels:
        p.append(_labels("node_labels", ff.node_labels, lambda f: f.node_labels))
    if ff.source_workload:
        p.append(_workloads(ff.source_workload, True))
    if ff.destination_workload:
        p.append(_workloads(ff.destination_workload, False))
    if ff.source_cluster_name:
        src_clusters = frozenset(ff.source_cluster_name)
        p.append(lambda f: f.source.cluster_name in src_clusters)
    if ff.destination_cluster_name:
        dst_clusters = frozenset(ff.destination_cluster_name)
        p.append(lambda f: f.destination.cluster_name in dst_clusters)
    if ff.traffic_direction:
        directions = frozenset(ff.traffic_direction)
        p.append(lambda f: f.traffic_direction in directions)
    if ff.verdict:
        verdicts = frozenset(ff.verdict)
        p.append(lambda f: f.verdict in verdicts)
    if ff.drop_reason_desc:
        reasons = frozenset(ff.drop_reason_desc)
        p.append(lambda f: f.drop_reason_desc in reasons)
    if ff.interface:
        p.append(_interfaces(ff.interface))
    if ff.event_type:
        p.append(_event_types(ff.event_type))
    if ff.http_status_code:
        p.append(_http_codes(ff.http_status_code))
    if ff.protocol:
        p.append(_protocols(ff.protocol))
    if ff.source_port:
        sports = parse_ports("source_port", ff.source_port)
        p.append(lambda f: (ports := _l4_ports(f)) is not None and ports[0] in sports)
    if ff.destination_port:
        dports = parse_ports("destination_port", ff.destination_port)
        p.append(lambda f: (ports := _l4_ports(f)) is not None and ports[1] in dports)
    if ff.reply:
        p.append(_reply(ff.reply))
    if ff.dns_query:
        p.append(_regexes("dns_query", ff.dns_query,
                          lambda f: f.l7.dns.query if f.l7.WhichOneof("record") == "dns" else None))
    if ff.source_identity:
        src_ids = frozenset(ff.source_identity)
        p.append(lambda f: f.source.identity in src_ids)
    if ff.destination_identity:
        dst_ids = frozenset(ff.destination_identity)
        p.append(lambda f: f.destination.identity in dst_ids)
    if ff.http_method:
        p.append(_never)
    if ff.http_path:
        _regexes("http_path", ff.http_path, lambda f: None)
        p.append(_never)
    if ff.http_url:
        _regexes("http_url", ff.http_url, lambda f: None)
        p.append(_never)
    if ff.http_header:
        p.append(_never)
    if ff.tcp_flags:
        p.append(_tcp_flags(ff.tcp_flags))
    if ff.node_name:
        p.append(_node_names(ff.node_name))
    if ff.ip_version:
        versions = frozenset(ff.ip_version)
        p.append(lambda f: f.IP.ipVersion in versions)
    if ff.trace_id:
        p.append(_never)
    if ff.ip_trace_id:
        if 0 in ff.ip_trace_id:
            raise FilterError("ip_trace_id: 0 is not a trace ID")
        p.append(_never)
    if ff.encrypted:
        encrypted = frozenset(ff.encrypted)
        p.append(lambda f: f.IP.encrypted in encrypted)
    if ff.HasField("experimental") and ff.experimental.cel_expression:
        raise FilterError("experimental.cel_expression: CEL filters are not supported by flowtel; "
                          "use the FlowFilter fields instead")
    return p


@dataclass(frozen=True, slots=True)
class Filters:
    """A compiled whitelist and blacklist."""

    whitelist: tuple[tuple[Predicate, ...], ...] = ()
    blacklist: tuple[tuple[Predicate, ...], ...] = ()

    def matches_flow(self, flow: Flow) -> bool:
        if self.whitelist and not any(all(p(flow) for p in preds) for preds in self.whitelist):
            return False
        return not any(all(p(flow) for p in preds) for preds in self.blacklist)

    def matches(self, resp: observer_pb2.GetFlowsResponse) -> bool:
        """Flows by the filters; lost-events and node-status responses always pass."""
        if resp.WhichOneof("response_types") != "flow":
            return True
        return self.matches_flow(resp.flow)

    @property
    def empty(self) -> bool:
        return not self.whitelist and not self.blacklist


def compile_filters(whitelist: Iterable[flow_pb2.FlowFilter] = (),
                    blacklist: Iterable[flow_pb2.FlowFilter] = ()) -> Filters:
    """Filters for a request's lists; FilterError (naming the list) for anything invalid."""
    out = []
    for name, filters in (("whitelist", list(whitelist)), ("blacklist", list(blacklist))):
        if len(filters) > MAX_FILTERS:
            raise FilterError(f"{name}: {len(filters)} filters, at most {MAX_FILTERS} are accepted")
        compiled = []
        for i, ff in enumerate(filters):
            try:
                compiled.append(tuple(compile_filter(ff)))
            except FilterError as exc:
                raise FilterError(f"{name}[{i}].{exc}") from None
        out.append(tuple(compiled))
    return Filters(out[0], out[1])
