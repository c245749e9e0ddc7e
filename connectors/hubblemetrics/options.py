"""Hubble's metric option grammar and context labels, shared by every family handler.

Mirrors cilium's ``pkg/hubble/metrics/api/context.go``: one string per metric,
``NAME[:OPT[;OPT…]]``; ``sourceContext``/``destinationContext`` (and their ``…EgressContext``/
``…IngressContext`` forms, which take precedence on flows of that direction) each add one
label whose value comes from the first non-empty of a ``|``-chained list of context kinds;
``labelsContext`` adds one label per listed name. Label order (reference/metric-compat.md):
labelsContext labels in Hubble's fixed order, then ``source``, then ``destination``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from flowtel.records import Endpoint, Flow, TrafficDirection, flow_fields

# Hubble's identifiers (pkg/hubble/metrics/api/context.go), and flowtel's ``workload``
# (namespace/workload-name, the workload analogue of ``pod``). Matched case-insensitively, as Hubble does.
CONTEXT_KINDS = ("identity", "namespace", "pod", "pod-short", "pod-name", "dns", "ip", "reserved-identity",
                 "workload", "workload-name", "app")
# Hubble's six context options, by the lower-cased key Hubble matches: (side, direction the
# option applies to; None for both).
CONTEXT_OPTIONS = {
    "sourcecontext": ("source", None), "sourceegresscontext": ("source", TrafficDirection.EGRESS),
    "sourceingresscontext": ("source", TrafficDirection.INGRESS),
    "destinationcontext": ("destination", None),
    "destinationegresscontext": ("destination", TrafficDirection.EGRESS),
    "destinationingresscontext": ("destination", TrafficDirection.INGRESS),
}
# Hubble's order, which is also the order the labels appear in (not the order the user wrote).
# ``*_workload_kind`` are flowtel's additions (the workload's kind, e.g. Deployment).
LABELS_CONTEXT = ("source_ip", "source_pod", "source_namespace", "source_workload", "source_workload_kind",
                  "source_app", "destination_ip", "destination_pod", "destination_namespace",
                  "destination_workload", "destination_workload_kind", "destination_app", "traffic_direction")
APP_LABELS = ("app.kubernetes.io/name", "k8s-app", "app")
_APP_PREFIXES = tuple(f"k8s:{name}=" for name in APP_LABELS)  # Kubernetes labels only, as Hubble
KUBE_APISERVER = "reserved:kube-apiserver"
_HASH_PART = re.compile(r"[a-z0-9]+")  # one "-part" Hubble's pod-short removes; pod names are <= 253 chars


class OptionError(ValueError):
    """A metric string a user wrote that Hubble's grammar does not accept."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One parsed ``metrics:`` entry: the family name and its options in the order written."""

    name: str
    options: dict[str, str] = field(default_factory=dict)


def split_metrics(entries: list[str]) -> list[str]:
    """The metric strings of a ``metrics:`` list. An entry may hold several separated by
    whitespace, as Cilium's ``hubble-metrics`` ConfigMap value does
    (``"flow:sourceContext=pod tcp drop"``); options never contain whitespace."""
    return [text for entry in entries for text in entry.split()]


def parse_metric(text: str) -> MetricSpec:
    """Parse ``NAME[:OPT[;OPT…]]``; an option is ``key=value`` or a bare flag (``query``)."""
    name, _, rest = text.strip().partition(":")
    if not name:
        raise OptionError(f"{text!r}: a metric string starts with the family name, e.g. 'dns:query'")
    options: dict[str, str] = {}
    seen: set[str] = set()
    for raw in filter(None, (p.strip() for p in rest.split(";"))):
        key, sep, value = raw.partition("=")
        if key.lower() in seen:
            raise OptionError(f"{text!r}: option {key!r} given twice")
        seen.add(key.lower())
        options[key] = value if sep else ""
    return MetricSpec(name, options)


def endpoint_app(ep: Endpoint | None) -> str:
    """Hubble's ``app``: the value of the first of the endpoint's labels (in their order) that
    is ``k8s:app.kubernetes.io/name=``, ``k8s:k8s-app=`` or ``k8s:app=`` with a value."""
    if ep is None:
        return ""
    for label in ep.labels:
        for prefix in _APP_PREFIXES:
            if label.startswith(prefix) and len(label) > len(prefix):
                return label[len(prefix):]
    return ""


def pod_short(name: str) -> str:
    """Hubble's ``pod-short``: the name without its last two ``-part``s (``[a-z0-9]+`` each),
    or its last one when only one can go, as ``^(.+?)(-[a-z0-9]+){1,2}$`` → ``$1``;
    unchanged when neither matches. Done by splitting, so the cost is linear in the name."""
    parts = name.split("-")
    for k in (2, 1):
        if len(parts) > k and all(_HASH_PART.fullmatch(p) for p in parts[-k:]):
            prefix = "-".join(parts[:-k])
            if prefix:
                return prefix
    return name


def reserved_identity(labels: Sequence[str]) -> str:
    """Hubble's ``reserved-identity``: ``reserved:kube-apiserver`` when present (it wins over
    host, remote-node or world), else the first ``reserved:`` label."""
    if KUBE_APISERVER in labels:
        return KUBE_APISERVER
    return next((label for label in labels if label.startswith("reserved:")), "")


def _with_namespace(ep: Endpoint, name: str) -> str:
    # Hubble: the name, prefixed "namespace/" when the endpoint has a namespace.
    return f"{ep.namespace}/{name}" if ep.namespace else name


def _context_value(kind: str, ep: Endpoint | None, ip: str, names: Sequence[str]) -> str:
    if kind == "ip":
        return ip
    if kind == "dns":
        return ",".join(names)
    if ep is None:
        return ""
    if kind == "namespace":
        return ep.namespace
    if kind == "pod":
        return _with_namespace(ep, ep.pod_name)
    if kind == "pod-short":
        return _with_namespace(ep, pod_short(ep.pod_name))
    if kind == "pod-name":
        return ep.pod_name
    if kind == "identity":
        return ",".join(ep.labels)
    if kind == "reserved-identity":
        return reserved_identity(ep.labels)
    if kind == "workload":
        return f"{ep.namespace}/{ep.workloads[0].name}" if ep.workloads else ""
    if kind == "workload-name":
        return ep.workloads[0].name if ep.workloads else ""
    if kind == "app":
        return endpoint_app(ep)
    raise AssertionError(kind)


def _labels_context_value(name: str, flow: Flow) -> str:
    side, _, what = name.partition("_")
    if name == "traffic_direction":
        d = flow.traffic_direction
        return "ingress" if d is TrafficDirection.INGRESS else "egress" if d is TrafficDirection.EGRESS else "unknown"
    is_src = side == "source"
    ep = flow.source if is_src else flow.destination
    if what == "ip":
        return flow.src_ip if is_src else flow.dst_ip
    if ep is None:
        return ""
    if what == "pod":
        return ep.pod_name
    if what == "namespace":
        return ep.namespace
    if what == "workload":
        return ep.workloads[0].name if ep.workloads else ""
    if what == "workload_kind":
        return ep.workloads[0].kind if ep.workloads else ""
    return endpoint_app(ep)


def _parse_chain(text: str, key: str) -> tuple[str, ...]:
    kinds = tuple(k.strip().lower() for k in text.split("|"))
    for kind in kinds:
        if kind not in CONTEXT_KINDS:
            raise OptionError(f"{key}={text}: {kind!r} is not one of {'|'.join(CONTEXT_KINDS)}")
    return kinds


Chain = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SideContext:
    """One side's (``source`` or ``destination``) context chains: the one for both
    directions, and the egress/ingress ones that take precedence on flows of that direction."""

    both: Chain = ()
    egress: Chain = ()
    ingress: Chain = ()

    def __bool__(self) -> bool:
        return bool(self.both or self.egress or self.ingress)

    def chain(self, direction: TrafficDirection) -> Chain:
        if self.ingress and direction is TrafficDirection.INGRESS:
            return self.ingress
        if self.egress and direction is TrafficDirection.EGRESS:
            return self.egress
        return self.both


@dataclass(frozen=True, slots=True)
class ContextOptions:
    """The context part of a metric's options, parsed once; ``values`` runs per flow.

    The ``source`` label exists when any of the three source options is given (likewise
    ``destination``); on a flow of a direction without its own option, the both-directions
    chain gives the value, or ``""`` when there is none. Retina's Helm default
    ``sourceEgressContext=pod;destinationIngressContext=pod`` thus labels each pod's own
    sent packets with ``source`` and its received ones with ``destination``."""

    labels_context: tuple[str, ...] = ()
    source: SideContext = SideContext()
    destination: SideContext = SideContext()
    # Label values by what they depend on (see values); filled per flow, bounded.
    _memo: dict[tuple[object, ...], tuple[Endpoint | None, Endpoint | None, tuple[str, ...]]] = field(
        default_factory=dict, init=False, compare=False, repr=False, hash=False)

    @property
    def label_names(self) -> tuple[str, ...]:
        return (*self.labels_context, *(("source",) if self.source else ()),
                *(("destination",) if self.destination else ()))

    def values(self, flow: Flow) -> tuple[str, ...]:
        """Label values in ``label_names`` order.

        They depend only on the two endpoints, the direction, and (for ``ip``/``dns``
        contexts, or an end without an endpoint) the addresses and names. Enrichment shares
        one endpoint object among every record of a pod, so the values are computed once per
        (endpoints, direction, …) and the same tuple is handed out: a dict hit per flow
        instead of a chain walk and string building per label."""
        src, dst = flow.source, flow.destination
        key: tuple[object, ...] = (id(src), id(dst), flow.traffic_direction,
                                   flow.src_ip, flow.dst_ip, flow.source_names, flow.destination_names)
        memo = self._memo
        try:
            hit = memo.get(key)
        except TypeError:  # names given as a list (records declare tuples): nothing to key on
            return self._compute(flow)
        # The entry holds the endpoints themselves: an id is only theirs while they live.
        if hit is not None and hit[0] is src and hit[1] is dst:
            return hit[2]
        values = self._compute(flow)
        if len(memo) >= _MEMO_MAX:
            memo.clear()  # a new working set (pods churned): start again rather than grow
        memo[key] = (src, dst, values)
        return values

    def values_of(self, flows: Sequence[Flow]) -> list[tuple[str, ...]]:
        """:meth:`values` of every flow, in order (a batch at a time: the same memo, its
        key's fields read in one C call per flow)."""
        memo = self._memo
        out: list[tuple[str, ...]] = []
        append = out.append
        for flow in flows:
            src, dst, direction, src_ip, dst_ip, source_names, destination_names = _context_fields(flow)
            key = (id(src), id(dst), direction, src_ip, dst_ip, source_names, destination_names)
            try:
                hit = memo.get(key)
            except TypeError:  # names given as a list: what values does with them
                append(self._compute(flow))
                continue
            if hit is not None and hit[0] is src and hit[1] is dst:
                append(hit[2])
                continue
            values = self._compute(flow)
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[key] = (src, dst, values)
            append(values)
        return out

    def _compute(self, flow: Flow) -> tuple[str, ...]:
        out = [_labels_context_value(n, flow) for n in self.labels_context]
        if self.source:
            out.append(_first(self.source.chain(flow.traffic_direction), flow.source, flow.src_ip,
                              flow.source_names))
        if self.destination:
            out.append(_first(self.destination.chain(flow.traffic_direction), flow.destination, flow.dst_ip,
                              flow.destination_names))
        return tuple(out)


_MEMO_MAX = 65536
_context_fields = flow_fields("source", "destination", "traffic_direction", "src_ip", "dst_ip", "source_names",
                              "destination_names")


def _first(kinds: Chain, ep: Endpoint | None, ip: str, names: Sequence[str]) -> str:
    for kind in kinds:
        value = _context_value(kind, ep, ip, names)
        if value:
            return value
    return ""


def parse_context(options: dict[str, str], metric: str) -> ContextOptions:
    """Take the context options out of ``options`` (the rest are the family's own). Keys
    match case-insensitively, as in Hubble."""
    chains: dict[tuple[str, TrafficDirection | None], Chain] = {}
    labels: tuple[str, ...] = ()
    for key in list(options):
        lowered = key.lower()
        if lowered in CONTEXT_OPTIONS:
            chains[CONTEXT_OPTIONS[lowered]] = _parse_chain(options.pop(key), f"{metric}: {key}")
        elif lowered == "labelscontext":
            wanted = [n.strip() for n in options.pop(key).split(",")]
            for n in wanted:
                if n not in LABELS_CONTEXT:
                    raise OptionError(f"{metric}: labelsContext {n!r} is not one of {','.join(LABELS_CONTEXT)}")
            labels = tuple(n for n in LABELS_CONTEXT if n in wanted)

    def side(name: str) -> SideContext:
        return SideContext(chains.get((name, None), ()), chains.get((name, TrafficDirection.EGRESS), ()),
                           chains.get((name, TrafficDirection.INGRESS), ()))

    return ContextOptions(labels, side("source"), side("destination"))


def take_flag(options: dict[str, str], name: str) -> bool:
    """Remove a bare flag option (``query``, ``ignoreAAAA``) and say whether it was given
    (keys match case-insensitively, as in Hubble)."""
    for key in list(options):
        if key.lower() == name.lower():
            del options[key]
            return True
    return False


def reject_unknown(options: dict[str, str], metric: str) -> None:
    if options:
        raise OptionError(f"{metric}: unknown option(s) {', '.join(sorted(options))}")
