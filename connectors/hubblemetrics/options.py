"""Hubble's metric option grammar and context labels, shared by every family handler.

Mirrors cilium's ``pkg/hubble/metrics/api/context.go``: one string per metric,
``NAME[:OPT[;OPT…]]``; ``sourceContext``/``destinationContext`` each add one label whose
value comes from the first non-empty of a ``|``-chained list of context kinds;
``labelsContext`` adds one label per listed name. Label order (reference/metric-compat.md):
labelsContext labels in Hubble's fixed order, then ``source``, then ``destination``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from flowtel.records import Endpoint, Flow, TrafficDirection

CONTEXT_KINDS = ("identity", "namespace", "pod", "pod-short", "dns", "ip", "reserved-identity",
                 "workload", "workload-name", "app")
# Hubble's order, which is also the order the labels appear in (not the order the user wrote).
LABELS_CONTEXT = ("source_ip", "source_pod", "source_namespace", "source_workload", "source_workload_kind",
                  "source_app", "destination_ip", "destination_pod", "destination_namespace",
                  "destination_workload", "destination_workload_kind", "destination_app", "traffic_direction")
APP_LABELS = ("app.kubernetes.io/name", "k8s-app", "app")
# One or two trailing "-hash" parts: a Deployment's pod (name-<rs hash>-<pod hash>) or a
# StatefulSet/DaemonSet pod (name-<hash>). Hubble's pod-short strips these.
_POD_SUFFIX = re.compile(r"(-[a-z0-9]{9,10})?-[a-z0-9]{5}$")


class OptionError(ValueError):
    """A metric string a user wrote that Hubble's grammar does not accept."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One parsed ``metrics:`` entry: the family name and its options in the order written."""

    name: str
    options: dict[str, str] = field(default_factory=dict)


def parse_metric(text: str) -> MetricSpec:
    """Parse ``NAME[:OPT[;OPT…]]``; an option is ``key=value`` or a bare flag (``query``)."""
    name, _, rest = text.strip().partition(":")
    if not name:
        raise OptionError(f"{text!r}: a metric string starts with the family name, e.g. 'dns:query'")
    options: dict[str, str] = {}
    for raw in filter(None, (p.strip() for p in rest.split(";"))):
        key, sep, value = raw.partition("=")
        if key in options:
            raise OptionError(f"{text!r}: option {key!r} given twice")
        options[key] = value if sep else ""
    return MetricSpec(name, options)


def _labels_value(labels: list[str], wanted: str) -> str:
    for label in labels:
        # Endpoint labels are "source:key=value" (Hubble's form), e.g. "k8s:app=frontend".
        _, _, kv = label.partition(":")
        key, _, value = kv.partition("=")
        if key == wanted:
            return value
    return ""


def endpoint_app(ep: Endpoint | None) -> str:
    if ep is None:
        return ""
    for name in APP_LABELS:
        value = _labels_value(ep.labels, name)
        if value:
            return value
    return ""


def pod_short(name: str) -> str:
    return _POD_SUFFIX.sub("", name)


def _context_value(kind: str, ep: Endpoint | None, ip: str, names: list[str]) -> str:
    if kind == "ip":
        return ip
    if kind == "dns":
        return ",".join(names)
    if ep is None:
        return ""
    if kind == "namespace":
        return ep.namespace
    if kind == "pod":
        return f"{ep.namespace}/{ep.pod_name}" if ep.pod_name else ""
    if kind == "pod-short":
        return f"{ep.namespace}/{pod_short(ep.pod_name)}" if ep.pod_name else ""
    if kind == "identity":
        return ",".join(ep.labels)
    if kind == "reserved-identity":
        # Only reserved identities (host, world, …: labels "reserved:…") give a value.
        reserved = [label for label in ep.labels if label.startswith("reserved:")]
        return ",".join(reserved)
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
    kinds = tuple(k.strip() for k in text.split("|"))
    for kind in kinds:
        if kind not in CONTEXT_KINDS:
            raise OptionError(f"{key}={text}: {kind!r} is not one of {'|'.join(CONTEXT_KINDS)}")
    return kinds


@dataclass(frozen=True, slots=True)
class ContextOptions:
    """The context part of a metric's options, parsed once; ``values`` runs per flow."""

    labels_context: tuple[str, ...] = ()
    source: tuple[str, ...] = ()
    destination: tuple[str, ...] = ()

    @property
    def label_names(self) -> tuple[str, ...]:
        return (*self.labels_context, *(("source",) if self.source else ()),
                *(("destination",) if self.destination else ()))

    def values(self, flow: Flow) -> tuple[str, ...]:
        """Label values in ``label_names`` order."""
        out = [_labels_context_value(n, flow) for n in self.labels_context]
        if self.source:
            out.append(_first(self.source, flow.source, flow.src_ip, flow.source_names))
        if self.destination:
            out.append(_first(self.destination, flow.destination, flow.dst_ip, flow.destination_names))
        return tuple(out)


def _first(kinds: tuple[str, ...], ep: Endpoint | None, ip: str, names: list[str]) -> str:
    for kind in kinds:
        value = _context_value(kind, ep, ip, names)
        if value:
            return value
    return ""


def parse_context(options: dict[str, str], metric: str) -> ContextOptions:
    """Take the context options out of ``options`` (the rest are the family's own)."""
    source: tuple[str, ...] = ()
    destination: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    if "sourceContext" in options:
        source = _parse_chain(options.pop("sourceContext"), f"{metric}: sourceContext")
    if "destinationContext" in options:
        destination = _parse_chain(options.pop("destinationContext"), f"{metric}: destinationContext")
    if "labelsContext" in options:
        wanted = [n.strip() for n in options.pop("labelsContext").split(",") if n.strip()]
        for n in wanted:
            if n not in LABELS_CONTEXT:
                raise OptionError(f"{metric}: labelsContext {n!r} is not one of {','.join(LABELS_CONTEXT)}")
        labels = tuple(n for n in LABELS_CONTEXT if n in wanted)
    return ContextOptions(labels, source, destination)


def take_flag(options: dict[str, str], name: str) -> bool:
    """Remove a bare flag option (``query``, ``ignoreAAAA``) and say whether it was given."""
    return options.pop(name, None) is not None


def reject_unknown(options: dict[str, str], metric: str) -> None:
    if options:
        raise OptionError(f"{metric}: unknown option(s) {', '.join(sorted(options))}")

