"""Flow filters with ``hubble observe``'s flags and semantics, shared by server and client.

The flows extension applies them before a flow enters a client's stream; ``flowtel observe``
builds them from its command line (to reject a bad flag before connecting) and applies them
to files it reads (``--input-file``). The wire form is the flag list itself, in order, so
one builder serves both ends and ``--not`` keeps its position.

Semantics are Hubble's (cilium/hubble ``cmd/observe/flows_filter.go`` and cilium
``pkg/hubble/filters``):

- Values of one flag OR; different flags AND.
- ``--pod``, ``--ip``, ``--port``, ``--label`` and ``--fqdn`` without ``from-``/``to-``
  match either end: they make two filters, one about the source and one about the
  destination, and a flow passes if either passes. Every other flag given is part of both.
  So ``--pod a --port 80`` is (source pod a AND source port 80) OR (destination pod a AND
  destination port 80), exactly as in Hubble.
- ``--not`` puts the next flag into the deny list. All negated flags build one deny filter
  set with the same rules, and a flow is shown if it passes the allow filters (or there
  are none) and passes none of the deny filters. ``--not --ip A --not --port 53`` therefore
  hides flows that have address A *and* port 53 on the same end, as Hubble does.
- Pod names are ``[namespace/]prefix``; a name without a namespace is in ``default``.
  ``--namespace NS`` restricts the pod filters (or, alone, matches any pod in NS) on the
  source in one filter and the destination in the other.
- FQDN patterns allow ``*`` (any run of ``[-a-zA-Z0-9_.]``), case-insensitive, trailing dot
  ignored. They match ``source_names``/``destination_names``; a DNS flow's
  ``l7.dns.query`` also counts as a destination name for ``--to-fqdn`` and ``--fqdn`` (the
  lookup of a name is traffic towards it), which Hubble keeps in a separate flag.
- Lost-events records always pass: a user watching a filtered stream must still learn
  that records were missed.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import re2

from flowtel.labelselector import Requirement, parse_labels, parse_selector, selector_matches
from flowtel.records import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Endpoint,
    Flow,
    FlowType,
    LostEvents,
    Record,
    TrafficDirection,
    Verdict,
)

# Flags that take a value, in the order `flowtel observe --help` lists them.
FILTER_FLAGS: tuple[str, ...] = (
    "namespace", "from-namespace", "to-namespace",
    "pod", "from-pod", "to-pod",
    "label", "from-label", "to-label",
    "ip", "from-ip", "to-ip",
    "port", "from-port", "to-port",
    "fqdn", "from-fqdn", "to-fqdn",
    "protocol", "verdict", "type",
)
NOT_FLAG = "not"

# Hubble's pairs of flags that make no sense together within one allow or deny list.
_CONFLICTS: tuple[frozenset[str], ...] = tuple(frozenset(g) for g in (
    ("from-fqdn", "from-ip", "ip", "fqdn", "from-namespace", "namespace"),
    ("from-fqdn", "from-ip", "ip", "fqdn", "from-pod", "pod"),
    ("to-fqdn", "to-ip", "ip", "fqdn", "to-namespace", "namespace"),
    ("to-fqdn", "to-ip", "ip", "fqdn", "to-pod", "pod"),
    ("to-pod", "namespace"),
    ("from-pod", "namespace"),
    ("label", "from-label"),
    ("label", "to-label"),
    ("port", "to-port"),
    ("port", "from-port"),
))

# Hubble's verdict names (flow.proto); flowtel emits a subset.
VERDICTS = ("VERDICT_UNKNOWN", "FORWARDED", "DROPPED", "ERROR", "AUDIT", "REDIRECTED", "TRACED", "TRANSLATED")
PROTOCOLS = ("tcp", "udp", "sctp", "icmp", "icmpv4", "icmpv6", "dns", "http", "kafka")

# Cilium monitor message types by the names `hubble observe --type` takes; `l3_l4` is
# flowtel's alias for the packet flows that Hubble calls trace events.
MESSAGE_TYPES = {
    "drop": 1, "debug": 2, "capture": 3, "trace": 4, "l3_l4": 4, "policy-verdict": 5,
    "recorder": 6, "trace-sock": 7, "l7": 129, "agent": 130,
}
TRACE_OBSERVATION_POINTS = {
    "to-endpoint": 0, "to-proxy": 1, "to-host": 2, "to-stack": 3, "to-overlay": 4,
    "from-endpoint": 5, "from-proxy": 6, "from-host": 7, "from-stack": 8, "from-overlay": 9,
    "from-network": 10, "to-network": 11,
}
_TYPE_DROP, _TYPE_TRACE, _TYPE_L7 = 1, 4, 129
_SUBTYPE_TO_ENDPOINT, _SUBTYPE_FROM_ENDPOINT = 0, 5

_FQDN_VALID = re.compile(r"^[-a-zA-Z0-9_.*]+$")
# A DNS name is at most 253 characters; a pattern may spell one with a few stars more.
# Patterns compile to RE2 (linear time in the name, whatever the stars), and this bounds
# what one filter value costs to compile and hold.
MAX_FQDN_PATTERN = 256


class FilterError(ValueError):
    """A filter flag or value a user gave that cannot be used; the message names it."""


@dataclass(slots=True)
class FlowFilter:
    """Hubble's ``FlowFilter``: fields AND, values within a field OR. Raw values as given."""

    source_pod: list[str] = field(default_factory=list)
    destination_pod: list[str] = field(default_factory=list)
    source_ip: list[str] = field(default_factory=list)
    destination_ip: list[str] = field(default_factory=list)
    source_port: list[str] = field(default_factory=list)
    destination_port: list[str] = field(default_factory=list)
    source_label: list[str] = field(default_factory=list)
    destination_label: list[str] = field(default_factory=list)
    source_fqdn: list[str] = field(default_factory=list)
    destination_fqdn: list[str] = field(default_factory=list)
    protocol: list[str] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)
    event_type: list[str] = field(default_factory=list)

    def copy(self) -> FlowFilter:
        return FlowFilter(**{name: list(getattr(self, name)) for name in self.__slots__})  # type: ignore[attr-defined]


Predicate = Callable[[Flow], bool]


@dataclass(slots=True)
class _Tracker:
    """One allow or deny list under construction: Hubble's filterTracker (left OR right)."""

    left: FlowFilter | None = None
    right: FlowFilter | None = None
    ns: list[str] = field(default_factory=list)
    src_ns: list[str] = field(default_factory=list)
    dst_ns: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def both(self, attr: str, value: str) -> None:
        self.one("left", attr, value)
        self.one("right", attr, value)

    def one(self, side: str, attr: str, value: str) -> None:
        ff = getattr(self, side)
        if ff is None:
            ff = FlowFilter()
            setattr(self, side, ff)
        getattr(ff, attr).append(value)

    def materialize(self) -> list[FlowFilter]:
        if self.left is None and self.right is None and not (self.ns or self.src_ns or self.dst_ns):
            return []
        left = self.left.copy() if self.left is not None else FlowFilter()
        right = self.right.copy() if self.right is not None else FlowFilter()
        if self.dst_ns:
            for ff in (left, right):
                _apply_namespaces(ff, "destination_pod", self.dst_ns)
        if self.src_ns:
            for ff in (left, right):
                _apply_namespaces(ff, "source_pod", self.src_ns)
        if self.ns:
            _apply_namespaces(left, "source_pod", self.ns)
            _apply_namespaces(right, "destination_pod", self.ns)
        return [left] if left == right else [left, right]


def _apply_namespaces(ff: FlowFilter, attr: str, namespaces: list[str]) -> None:
    # No pod filter means "any pod": the empty prefix, which then gets each namespace.
    values = getattr(ff, attr) or [""]
    out: list[str] = []
    for value in values:
        if "/" in value:
            out.append(value)
        else:
            out.extend(f"{ns}/{value}" for ns in namespaces)
    setattr(ff, attr, out)


def _namespace_of(name: str) -> str:
    parts = name.split("/")
    return parts[0] if len(parts) > 1 else ""


@dataclass(slots=True)
class Filters:
    """A compiled allow list and deny list; ``matches`` is what a stream applies per record."""

    allow: list[FlowFilter] = field(default_factory=list)
    deny: list[FlowFilter] = field(default_factory=list)
    _allow: list[list[Predicate]] = field(init=False, repr=False, compare=False)
    _deny: list[list[Predicate]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._allow = [compile_filter(ff) for ff in self.allow]
        self._deny = [compile_filter(ff) for ff in self.deny]

    def matches(self, record: Record) -> bool:
        if not isinstance(record, Flow):
            return isinstance(record, LostEvents)
        if self._allow and not any(all(p(record) for p in preds) for preds in self._allow):
            return False
        return not any(all(p(record) for p in preds) for preds in self._deny)


def build_filters(pairs: Iterable[tuple[str, str]]) -> Filters:
    """Filters from ``(flag, value)`` pairs in command-line order (``("not", "")`` negates
    the next pair). Raises :class:`FilterError` naming the flag for anything invalid."""
    allow, deny = _Tracker(), _Tracker()
    negate = False
    for name, value in pairs:
        if name == NOT_FLAG:
            if negate:
                raise FilterError("consecutive --not statements")
            negate = True
            continue
        if name not in FILTER_FLAGS:
            raise FilterError(f"unknown filter --{name}; known: {', '.join('--' + f for f in FILTER_FLAGS)}, --not")
        tracker = deny if negate else allow
        negate = False
        if name not in tracker.changed:
            tracker.changed.append(name)
            _check_conflicts(tracker.changed)
        _set(tracker, name, value)
        _check_namespace_conflicts(tracker)
    if negate:
        raise FilterError("--not must be followed by a filter flag")
    return Filters(allow.materialize(), deny.materialize())


def _check_conflicts(changed: list[str]) -> None:
    for group in _CONFLICTS:
        present = [flag for flag in changed if flag in group]
        if len(present) > 1:
            raise FilterError(f"filters --{present[0]} and --{present[1]} cannot be combined")


def _check_namespace_conflicts(t: _Tracker) -> None:
    for ff in (t.left, t.right):
        if ff is None:
            continue
        for namespaces, names in ((t.ns, ff.source_pod), (t.ns, ff.destination_pod),
                                  (t.src_ns, ff.source_pod), (t.dst_ns, ff.destination_pod)):
            for ns in namespaces:
                for name in names:
                    other = _namespace_of(name)
                    if other and other != ns:
                        raise FilterError(f"namespace conflict: {ns!r} does not contain {name!r}")


# Flags about either end: a source filter on the left, a destination filter on the right.
_EITHER_END = frozenset({"pod", "ip", "port", "label", "fqdn"})


def _set(t: _Tracker, name: str, value: str) -> None:
    _validate(name, value)
    base = name.removeprefix("from-").removeprefix("to-")
    if name in ("namespace", "from-namespace", "to-namespace"):
        {"namespace": t.ns, "from-namespace": t.src_ns, "to-namespace": t.dst_ns}[name].append(value)
    elif name in _EITHER_END:
        t.one("left", f"source_{base}", value)
        t.one("right", f"destination_{base}", value)
    elif name.startswith("from-"):
        t.both(f"source_{base}", value)
    elif name.startswith("to-"):
        t.both(f"destination_{base}", value)
    elif name == "type":
        t.both("event_type", value)
    else:
        t.both(name, value)


def _validate(name: str, value: str) -> None:
    """Compile once so a bad value fails here, at the flag, not at the first flow."""
    base = name.removeprefix("from-").removeprefix("to-")
    try:
        if base == "namespace":
            if not value or "/" in value:
                raise FilterError(f"--{name}: expected a namespace name, got {value!r}")
        elif base == "pod":
            _pod_matcher([value])
        elif base == "ip":
            _ip_matcher([value])
        elif base == "port":
            _port_set([value])
        elif base == "label":
            _label_selectors([value])
        elif base == "fqdn":
            _fqdn_patterns([value])
        elif name == "protocol":
            _protocols([value])
        elif name == "verdict":
            _verdicts([value])
        elif name == "type":
            _event_types([value])
    except FilterError as exc:
        message = str(exc)
        raise FilterError(message if message.startswith("--") else f"--{name}: {message}") from None


# --- compiling one FlowFilter into predicates --------------------------------------------


def compile_filter(ff: FlowFilter) -> list[Predicate]:
    """The predicates a flow must all pass, one per non-empty field of ``ff``."""
    preds: list[Predicate] = []
    if ff.source_pod:
        preds.append(_endpoint_pred(_pod_matcher(ff.source_pod), source=True))
    if ff.destination_pod:
        preds.append(_endpoint_pred(_pod_matcher(ff.destination_pod), source=False))
    if ff.source_ip:
        match_ip = _ip_matcher(ff.source_ip)
        preds.append(lambda f: match_ip(f.src_ip))
    if ff.destination_ip:
        match_dst_ip = _ip_matcher(ff.destination_ip)
        preds.append(lambda f: match_dst_ip(f.dst_ip))
    if ff.source_port:
        sports = _port_set(ff.source_port)
        preds.append(lambda f: _has_ports(f) and f.src_port in sports)
    if ff.destination_port:
        dports = _port_set(ff.destination_port)
        preds.append(lambda f: _has_ports(f) and f.dst_port in dports)
    if ff.source_label:
        preds.append(_label_pred(_label_selectors(ff.source_label), source=True))
    if ff.destination_label:
        preds.append(_label_pred(_label_selectors(ff.destination_label), source=False))
    if ff.source_fqdn:
        preds.append(_fqdn_pred(_fqdn_patterns(ff.source_fqdn), source=True))
    if ff.destination_fqdn:
        preds.append(_fqdn_pred(_fqdn_patterns(ff.destination_fqdn), source=False))
    if ff.protocol:
        preds.append(_protocol_pred(_protocols(ff.protocol)))
    if ff.verdict:
        verdicts = _verdicts(ff.verdict)
        preds.append(lambda f: str(f.verdict) in verdicts)
    if ff.event_type:
        preds.append(_event_type_pred(_event_types(ff.event_type)))
    return preds


def _endpoint_pred(match: Callable[[str, str], bool], *, source: bool) -> Predicate:
    def pred(flow: Flow) -> bool:
        ep = flow.source if source else flow.destination
        return ep is not None and match(ep.namespace, ep.pod_name)

    return pred


def _pod_matcher(names: Sequence[str]) -> Callable[[str, str], bool]:
    rules: list[tuple[str, str]] = []
    for name in names:
        parts = name.split("/")
        if len(parts) > 1:
            ns, prefix = parts[0], parts[1]
        elif name:
            ns, prefix = "default", name  # Hubble: a bare name is in the default namespace
        else:
            raise FilterError(f"invalid filter, must be [namespace/][<name>], got {name!r}")
        rules.append((ns, prefix))

    def match(ns: str, pod: str) -> bool:
        if not ns and not pod:
            return False
        return any(ns == r_ns and pod.startswith(r_prefix) for r_ns, r_prefix in rules)

    return match


def _ip_matcher(values: Sequence[str]) -> Callable[[str], bool]:
    exact: set[str] = set()
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for value in values:
        try:
            if "/" in value:
                nets.append(ipaddress.ip_network(value, strict=False))
            else:
                # Normalized, so ::1 matches 0:0::1 as Go's net.ParseIP comparison would not;
                # flowtel's records hold canonical text, so this only widens user input.
                exact.add(str(ipaddress.ip_address(value)))
        except ValueError:
            kind = "CIDR" if "/" in value else "IP address"
            raise FilterError(f"invalid {kind} in filter: {value!r}") from None

    def match(ip: str) -> bool:
        if not ip:
            return False
        if ip in exact:
            return True
        if nets:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return False
            return any(addr in net for net in nets)
        return False

    return match


def _port_set(values: Sequence[str]) -> frozenset[int]:
    ports = set()
    for value in values:
        if not value.isdigit() or int(value) > 65535:
            raise FilterError(f"invalid port {value!r}: expected 0-65535")
        ports.add(int(value))
    return frozenset(ports)


def _has_ports(flow: Flow) -> bool:
    return flow.ip_version != 0 and flow.protocol in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP)


def _label_selectors(values: Sequence[str]) -> list[list[Requirement]]:
    try:
        return [parse_selector(v) for v in values]
    except ValueError as exc:
        raise FilterError(str(exc)) from None


def _label_pred(selectors: list[list[Requirement]], *, source: bool) -> Predicate:
    def pred(flow: Flow) -> bool:
        ep: Endpoint | None = flow.source if source else flow.destination
        labels = parse_labels(ep.labels) if ep is not None else []
        return any(selector_matches(reqs, labels) for reqs in selectors)

    return pred


def _fqdn_patterns(values: Sequence[str]) -> list[re2._Regexp]:
    out = []
    for value in values:
        pattern = value.strip().lower().removesuffix(".")
        if len(pattern) > MAX_FQDN_PATTERN:
            raise FilterError(f"FQDN pattern too long: {len(pattern)} characters, at most {MAX_FQDN_PATTERN}")
        if not _FQDN_VALID.match(pattern):
            raise FilterError(
                f'invalid FQDN in filter: only alphanumeric ASCII characters, the hyphen "-", "." and "*" are allowed: {value!r}'
            )
        # Runs of stars mean what one star means; RE2 matches in linear time either way.
        regex = re.sub(r"\*+", "*", pattern).replace(".", "[.]").replace("*", "[-a-zA-Z0-9_.]*")
        out.append(re2.compile(f"^{regex}$"))
    return out


def _fqdn_pred(patterns: list[re2._Regexp], *, source: bool) -> Predicate:
    def pred(flow: Flow) -> bool:
        names = list(flow.source_names if source else flow.destination_names)
        if not source and flow.l7 is not None and flow.l7.query:
            names.append(flow.l7.query)
        for name in names:
            name = name.lower().removesuffix(".")
            if any(p.match(name) for p in patterns):
                return True
        return False

    return pred


def _protocols(values: Sequence[str]) -> frozenset[str]:
    out = set()
    for value in values:
        proto = value.lower()
        if proto not in PROTOCOLS:
            raise FilterError(f"unknown protocol: {value!r}; known: {', '.join(PROTOCOLS)}")
        out.add(proto)
    return frozenset(out)


def _protocol_pred(protocols: frozenset[str]) -> Predicate:
    l4: set[int] = set()
    for name, numbers in (("tcp", (IPPROTO_TCP,)), ("udp", (IPPROTO_UDP,)), ("sctp", (IPPROTO_SCTP,)),
                          ("icmp", (IPPROTO_ICMP, IPPROTO_ICMPV6)), ("icmpv4", (IPPROTO_ICMP,)),
                          ("icmpv6", (IPPROTO_ICMPV6,))):
        if name in protocols:
            l4.update(numbers)
    want_dns = "dns" in protocols  # http and kafka are accepted as Hubble does; flowtel has no such L7

    def pred(flow: Flow) -> bool:
        if flow.ip_version != 0 and flow.protocol in l4:
            return True
        return want_dns and flow.l7 is not None

    return pred


def _verdicts(values: Sequence[str]) -> frozenset[str]:
    out = set()
    for value in values:
        verdict = value.upper()
        if verdict not in VERDICTS:
            raise FilterError(f"invalid --verdict value: {value!r}; known: {', '.join(VERDICTS)}")
        out.add(verdict)
    return frozenset(out)


def _event_types(values: Sequence[str]) -> list[tuple[int, int | None]]:
    out: list[tuple[int, int | None]] = []
    for value in values:
        head, _, sub = value.partition(":")
        type_ = MESSAGE_TYPES.get(head.lower())
        if type_ is None:
            if not head.isdigit():
                raise FilterError(
                    f"unable to parse type {head!r}: not a known type name ({', '.join(MESSAGE_TYPES)}) nor a number"
                )
            type_ = int(head)
        subtype: int | None = None
        if sub:
            if type_ == _TYPE_TRACE and sub in TRACE_OBSERVATION_POINTS:
                subtype = TRACE_OBSERVATION_POINTS[sub]
            elif sub.isdigit():
                subtype = int(sub)
            else:
                raise FilterError(f"unable to parse event sub-type {sub!r}: not a known sub-type name nor a number")
        out.append((type_, subtype))
    return out


def event_type(flow: Flow) -> tuple[int, int]:
    """The flow's Cilium ``event_type`` (type, sub_type), as :func:`flowtel.hubble.flow_to_dict` emits it."""
    if flow.flow_type == FlowType.L7:
        return _TYPE_L7, 0
    if flow.verdict == Verdict.DROPPED:
        return _TYPE_DROP, 0
    if flow.traffic_direction == TrafficDirection.EGRESS:
        return _TYPE_TRACE, _SUBTYPE_FROM_ENDPOINT
    return _TYPE_TRACE, _SUBTYPE_TO_ENDPOINT


def _event_type_pred(types: list[tuple[int, int | None]]) -> Predicate:
    def pred(flow: Flow) -> bool:
        t, sub = event_type(flow)
        return any((not want_t or want_t == t) and (want_sub is None or want_sub == sub) for want_t, want_sub in types)

    return pred
