"""Prometheus text exposition (format 0.0.4) of metric families, with names kept exactly.

Why not prometheus-client: its Counter and CounterMetricFamily add ``_total`` to every
counter's name, which would turn ACNS's ``networkobservability_drop_count`` into
``networkobservability_drop_count_total`` and break the dashboards flowtel exists to keep
working. The text format itself has no such rule (only OpenMetrics does), so counters are
written as-is with ``# TYPE … counter`` and gauges with ``# TYPE … gauge``: names exact,
types right, and ``hubble_*_total`` names, which already end in ``_total``, unchanged.
Histograms are ``# TYPE name histogram`` with ``name_bucket{le="…"}`` (cumulative counts,
``+Inf`` last and equal to the count), ``name_sum`` and ``name_count``; ``name`` is the
metric's name as given.

Characters Prometheus cannot carry (``k8s.pod.name``'s dots) become ``_`` in metric and
label names, as the Collector's Prometheus exporter does; two attribute keys that map to
one label name have their values joined with ``;`` in key order.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

from flowtel.lib.metrics.series import FamilySnapshot, HistogramValue
from flowtel.records import MetricKind

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SELF_TELEMETRY_PREFIX = "flowtel_component_"

_METRIC_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(name: str) -> str:
    out = _METRIC_BAD.sub("_", name)
    return "_" + out if out[:1].isdigit() else out


def label_name(name: str) -> str:
    out = _LABEL_BAD.sub("_", name)
    return "_" + out if out[:1].isdigit() else out


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(attributes: Mapping[str, str]) -> str:
    if not attributes:
        return ""
    merged: dict[str, str] = {}
    for key in sorted(attributes):
        name = label_name(key)
        value = attributes[key]
        merged[name] = f"{merged[name]};{value}" if name in merged else value
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in merged.items()) + "}"


_TYPES = {MetricKind.SUM: "counter", MetricKind.GAUGE: "gauge", MetricKind.HISTOGRAM: "histogram"}


def _histogram_lines(lines: list[str], name: str, attributes: Mapping[str, str], value: HistogramValue) -> None:
    labels = _labels(attributes)
    # ``le`` goes last, after the series' own labels, as client libraries write it.
    prefix = labels[:-1] + "," if labels else "{"
    cumulative = 0
    for bound, count in zip(value.bounds, value.bucket_counts):
        cumulative += count
        lines.append(f'{name}_bucket{prefix}le="{format_value(float(bound))}"}} {cumulative}')
    lines.append(f'{name}_bucket{prefix}le="+Inf"}} {value.count}')
    lines.append(f"{name}_sum{labels} {format_value(value.sum)}")
    lines.append(f"{name}_count{labels} {value.count}")


def render(families: Iterable[FamilySnapshot], telemetry: Mapping[tuple[str, str], float] | None = None,
           counters: frozenset[tuple[str, str]] = frozenset()) -> str:
    """The whole /metrics page. ``telemetry`` is the agent's snapshot; ``counters`` says which of
    its keys are counters (the others are gauges)."""
    lines: list[str] = []
    for family in sorted(families, key=lambda f: f.name):
        if not family.points:
            continue
        name = metric_name(family.name)
        kind = _TYPES[family.kind]
        lines.append(f"# HELP {name} {_escape_help(family.description or family.name)}")
        lines.append(f"# TYPE {name} {kind}")
        if family.kind is MetricKind.HISTOGRAM:
            for attributes, value, _start in family.points:
                _histogram_lines(lines, name, attributes, value)  # type: ignore[arg-type]  # a family's points are all histograms or all numbers, as its kind says
            continue
        for attributes, value, _start in family.points:
            lines.append(f"{name}{_labels(attributes)} {format_value(value)}")  # type: ignore[arg-type]  # a family's points are all histograms or all numbers, as its kind says
    if telemetry:
        by_name: dict[str, list[tuple[str, float, bool]]] = {}
        for (component, counter), value in telemetry.items():
            by_name.setdefault(counter, []).append((component, value, (component, counter) in counters))
        for counter in sorted(by_name):
            rows = sorted(by_name[counter])
            name = metric_name(SELF_TELEMETRY_PREFIX + counter)
            kind = "counter" if all(is_counter for _, _, is_counter in rows) else "gauge"
            lines.append(f"# HELP {name} flowtel self-telemetry: {counter} per component")
            lines.append(f"# TYPE {name} {kind}")
            for component, value, _ in rows:
                lines.append(f'{name}{{component="{_escape_value(component)}"}} {format_value(value)}')
    lines.append("")
    return "\n".join(lines)
