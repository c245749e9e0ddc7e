"""``hubble observe``'s filter flags into Cilium ``FlowFilter`` messages.

``flowtel observe`` builds the request's whitelist and blacklist here, as Hubble CLI does
(cilium/hubble ``cmd/observe/flows_filter.go``), and sends them to any Hubble server —
flowtel's ``hubble`` extension or Hubble Relay — or applies them to a flow-log file with
:mod:`flowtel.lib.hubble.filters`. Rules:

- Values of one flag OR; different flags AND.
- ``--pod``, ``--ip``, ``--port``, ``--label`` and ``--fqdn`` without ``from-``/``to-``
  match either end: they make two filters, one about the source and one about the
  destination, and a flow passes if either passes. Every other flag given is part of both.
  So ``--pod a --port 80`` is (source pod a AND source port 80) OR (destination pod a AND
  destination port 80), exactly as in Hubble.
- ``--not`` puts the next flag into the blacklist, built by the same rules.
- Pod names are ``[namespace/]prefix``; ``--namespace NS`` restricts the pod filters (or,
  alone, matches any pod in NS) on the source in one filter and the destination in the
  other.
- ``--to-fqdn``/``--fqdn`` also match the DNS lookups of the name (flowtel's habit: the
  lookup of a name is traffic towards it). In Hubble's terms: every filter with a
  ``destination_fqdn`` gets a twin with the same fields and, instead, a ``dns_query``
  expression for the same names, so any Hubble server (Relay included) evaluates it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.filters import FilterError, compile_filters, fqdn_regex, parse_namespaced_name

# Flags that take a value, in the order `flowtel observe --help` lists them.
FILTER_FLAGS: tuple[str, ...] = (
    "namespace", "from-namespace", "to-namespace",
    "pod", "from-pod", "to-pod",
    "label", "from-label", "to-label",
    "ip", "from-ip", "to-ip",
    "port", "from-port", "to-port",
    "fqdn", "from-fqdn", "to-fqdn",
    "protocol", "verdict", "type",
    "traffic-direction", "node-name", "drop-reason-desc", "identity", "from-identity", "to-identity",
    "uuid",
)
BOOL_FLAGS: tuple[str, ...] = ("is-reply",)
NOT_FLAG = "not"

# Hubble's groups of flags that make no sense together within one list.
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
    ("identity", "to-identity"),
    ("identity", "from-identity"),
))

# Cilium monitor message types by the names `hubble observe --type` takes; `l3_l4` is
# flowtel's alias for packet flows (Hubble's trace events).
MESSAGE_TYPES = {
    "drop": 1, "debug": 2, "capture": 3, "trace": 4, "l3_l4": 4, "policy-verdict": 5,
    "recorder": 6, "trace-sock": 7, "l7": 129, "agent": 130,
}
TRACE_OBSERVATION_POINTS = {
    "to-endpoint": 0, "to-proxy": 1, "to-host": 2, "to-stack": 3, "to-overlay": 4,
    "from-endpoint": 5, "from-proxy": 6, "from-host": 7, "from-stack": 8, "from-overlay": 9,
    "from-network": 10, "to-network": 11,
}
_TYPE_TRACE = 4


@dataclass(slots=True)
class _Tracker:
    """One list under construction: Hubble's filterTracker (left OR right)."""

    left: flow_pb2.FlowFilter | None = None
    right: flow_pb2.FlowFilter | None = None
    ns: list[str] = field(default_factory=list)
    src_ns: list[str] = field(default_factory=list)
    dst_ns: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def side(self, name: str) -> flow_pb2.FlowFilter:
        ff = getattr(self, name)
        if ff is None:
            ff = flow_pb2.FlowFilter()
            setattr(self, name, ff)
        return ff

    def both(self) -> tuple[flow_pb2.FlowFilter, ...]:
        return self.side("left"), self.side("right")

    def materialize(self) -> list[flow_pb2.FlowFilter]:
        if self.left is None and self.right is None and not (self.ns or self.src_ns or self.dst_ns):
            return []
        left = flow_pb2.FlowFilter()
        right = flow_pb2.FlowFilter()
        if self.left is not None:
            left.CopyFrom(self.left)
        if self.right is not None:
            right.CopyFrom(self.right)
        for ff in (left, right):
            if self.dst_ns:
                _apply_namespaces(ff.destination_pod, self.dst_ns)
            if self.src_ns:
                _apply_namespaces(ff.source_pod, self.src_ns)
        if self.ns:
            _apply_namespaces(left.source_pod, self.ns)
            _apply_namespaces(right.destination_pod, self.ns)
        return [left] if left == right else [left, right]


def _apply_namespaces(pods: Any, namespaces: list[str]) -> None:  # a repeated string field
    # No pod filter means "any pod": the empty prefix, which then gets each namespace.
    values = list(pods) or [""]
    out: list[str] = []
    for value in values:
        if "/" in value:
            out.append(value)
        else:
            out.extend(f"{ns}/{value}" for ns in namespaces)
    del pods[:]
    pods.extend(out)


def build_filters(pairs: Iterable[tuple[str, str]]) -> tuple[list[flow_pb2.FlowFilter], list[flow_pb2.FlowFilter]]:
    """``(whitelist, blacklist)`` from ``(flag, value)`` pairs in command-line order
    (``("not", "")`` negates the next pair). Raises FilterError naming the flag."""
    allow, deny = _Tracker(), _Tracker()
    negate = False
    for name, value in pairs:
        if name == NOT_FLAG:
            if negate:
                raise FilterError("consecutive --not statements")
            negate = True
            continue
        if name not in FILTER_FLAGS and name not in BOOL_FLAGS:
            raise FilterError(f"unknown filter --{name}; known: "
                              f"{', '.join('--' + f for f in FILTER_FLAGS + BOOL_FLAGS)}, --not")
        tracker = deny if negate else allow
        negate = False
        if name not in tracker.changed:
            tracker.changed.append(name)
            _check_conflicts(tracker.changed)
        try:
            _set(tracker, name, value)
            _check_value(name, value)
        except FilterError as exc:
            raise FilterError(f"--{name}: {exc}") from None
        _check_namespace_conflicts(tracker)
    if negate:
        raise FilterError("--not must be followed by a filter flag")
    whitelist, blacklist = _with_lookups(allow.materialize()), _with_lookups(deny.materialize())
    try:
        compile_filters(whitelist, blacklist)  # every value checked here, before connecting
    except FilterError as exc:
        raise FilterError(f"invalid filter: {exc}") from None
    return whitelist, blacklist


def _check_value(name: str, value: str) -> None:
    """Compile the flag alone, so a bad value is reported at its flag (as Hubble CLI does)."""
    if name in ("namespace", "from-namespace", "to-namespace"):
        return
    alone = _Tracker()
    _set(alone, name, value)
    try:
        compile_filters(alone.materialize())
    except FilterError as exc:
        # "whitelist[0].source_ip: invalid IP address ..." -> "invalid IP address ..."
        raise FilterError(str(exc).split(": ", 1)[-1]) from None


def _with_lookups(filters: list[flow_pb2.FlowFilter]) -> list[flow_pb2.FlowFilter]:
    out = list(filters)
    for ff in filters:
        if ff.destination_fqdn and not ff.dns_query:
            twin = flow_pb2.FlowFilter()
            twin.CopyFrom(ff)
            del twin.destination_fqdn[:]
            # The query as the DNS message has it: any case, with its trailing dot.
            twin.dns_query.extend("(?i)" + fqdn_regex(p)[:-1] + "[.]?$" for p in ff.destination_fqdn)
            out.append(twin)
    return out


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
                    other = name.split("/")[0] if "/" in name else ""
                    if other and other != ns:
                        raise FilterError(f"namespace conflict: {ns!r} does not contain {name!r}")


_EITHER_END = {"pod": "pod", "ip": "ip", "port": "port", "label": "label", "fqdn": "fqdn", "identity": "identity"}


def _enum(enum: Any, value: str, what: str) -> int:  # a generated enum (EnumTypeWrapper)
    try:
        return enum.Value(value.upper())
    except ValueError:
        raise FilterError(f"invalid {what} {value!r}; known: {', '.join(enum.keys())}") from None


def _event_type(value: str) -> flow_pb2.EventTypeFilter:
    head, _, sub = value.partition(":")
    type_ = MESSAGE_TYPES.get(head.lower())
    if type_ is None:
        if not head.isdigit():
            raise FilterError(f"unable to parse type {head!r}: not a known type name "
                              f"({', '.join(MESSAGE_TYPES)}) nor a number")
        type_ = int(head)
    etf = flow_pb2.EventTypeFilter(type=type_)
    if sub:
        if type_ == _TYPE_TRACE and sub in TRACE_OBSERVATION_POINTS:
            etf.sub_type = TRACE_OBSERVATION_POINTS[sub]
        elif sub.isdigit():
            etf.sub_type = int(sub)
        else:
            raise FilterError(f"unable to parse event sub-type {sub!r}: not a known sub-type name nor a number")
        etf.match_sub_type = True
    return etf


def _identity(value: str) -> int:
    if not value.isdigit() or int(value) > 0xFFFFFFFF:
        raise FilterError(f"invalid identity {value!r}: expected a number")
    return int(value)


def _set(t: _Tracker, name: str, value: str) -> None:
    base = name.removeprefix("from-").removeprefix("to-")
    if name in ("namespace", "from-namespace", "to-namespace"):
        if not value or "/" in value:
            raise FilterError(f"expected a namespace name, got {value!r}")
        {"namespace": t.ns, "from-namespace": t.src_ns, "to-namespace": t.dst_ns}[name].append(value)
        return
    if base == "pod" and parse_namespaced_name(value) == ("", ""):
        raise FilterError(f"invalid filter, must be [namespace/][<name>], got {value!r}")
    sides: tuple[tuple[str, str], ...]
    if name in _EITHER_END:
        sides = (("left", "source_"), ("right", "destination_"))
    elif name.startswith("from-"):
        sides = (("left", "source_"), ("right", "source_"))
    elif name.startswith("to-"):
        sides = (("left", "destination_"), ("right", "destination_"))
    else:
        sides = ()
    if sides:
        for side, prefix in sides:
            ff = t.side(side)
            attr = prefix + base
            getattr(ff, attr).append(_identity(value) if base == "identity" else value)
        return
    for ff in t.both():
        if name == "protocol":
            ff.protocol.append(value)
        elif name == "verdict":
            ff.verdict.append(_enum(flow_pb2.Verdict, value, "verdict"))
        elif name == "type":
            ff.event_type.append(_event_type(value))
        elif name == "traffic-direction":
            ff.traffic_direction.append(_enum(flow_pb2.TrafficDirection, value, "traffic direction"))
        elif name == "drop-reason-desc":
            ff.drop_reason_desc.append(_enum(flow_pb2.DropReason, value, "drop reason"))
        elif name == "node-name":
            ff.node_name.append(value)
        elif name == "uuid":
            ff.uuid.append(value)
        elif name == "is-reply":
            if value not in ("true", "false"):
                raise FilterError(f"expected true or false, got {value!r}")
            ff.reply.append(value == "true")
