"""The agent's own counters and gauges (flowtel.component.Telemetry) as metric points, named
as the prometheus exporter serves them: ``flowtel_component_<name>{component="<id>"}``."""
from __future__ import annotations

from flowtel.component import Telemetry
from flowtel.records import MetricKind, MetricPoint

SELF_TELEMETRY_PREFIX = "flowtel_component_"


def telemetry_points(telemetry: Telemetry, now_ns: int) -> list[MetricPoint]:
    """One point per (component, name). A name is a SUM only when every component's value of it
    is a counter: one metric cannot be both kinds, and the prometheus exporter decides the same."""
    snapshot = telemetry.snapshot()
    # Telemetry keeps counters and gauges apart but shows one snapshot; a key is a counter
    # exactly when the counter store knows it (gauges are never added to).
    is_counter: dict[str, bool] = {}
    for (component, name) in snapshot:
        counter = telemetry.get(component, name) != 0
        is_counter[name] = is_counter.get(name, True) and counter
    return [
        MetricPoint(SELF_TELEMETRY_PREFIX + name, float(value),
                    MetricKind.SUM if is_counter[name] else MetricKind.GAUGE, now_ns, {"component": component},
                    "", f"flowtel self-telemetry: {name} per component")
        for (component, name), value in snapshot.items()
    ]
