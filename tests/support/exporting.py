"""Builders shared by the exporter tests: settings, metric points, flows, waiting."""
from __future__ import annotations

import time
from typing import Callable

from flowtel.component import CreateSettings, Telemetry
from flowtel.records import (
    TCP_ACK,
    TCP_SYN,
    Endpoint,
    Flow,
    MetricKind,
    MetricPoint,
    TrafficDirection,
    Verdict,
    Workload,
)

NODE = "node-1"
T0 = 1732621545_123456789


def settings(component_id: str, telemetry: Telemetry | None = None) -> CreateSettings:
    return CreateSettings(id=component_id, node_name=NODE, telemetry=telemetry or Telemetry())


def point(name: str, value: float, kind: MetricKind = MetricKind.SUM, **attributes: str) -> MetricPoint:
    return MetricPoint(name=name, value=value, kind=kind, time_ns=time.time_ns(), attributes=attributes)


def pod_flow(i: int = 0, **overrides: object) -> Flow:
    fields: dict[str, object] = dict(
        time_ns=T0 + i,
        node_name=NODE,
        verdict=Verdict.FORWARDED,
        ip_version=4,
        src_ip="10.1.0.5",
        dst_ip="10.1.0.9",
        protocol=6,
        src_port=41234 + i,
        dst_port=80,
        traffic_direction=TrafficDirection.INGRESS,
        is_reply=False,
        ifindex=12,
        ifname="veth1a2b",
        packets=3,
        bytes=180,
        tcp_flags=TCP_SYN | TCP_ACK,
        source=Endpoint(namespace="shop", pod_name="frontend-7c9d", labels=["k8s:app=frontend"],
                        workloads=[Workload("frontend", "Deployment")],
                        attributes={"k8s.namespace.name": "shop", "k8s.pod.name": "frontend-7c9d",
                                    "k8s.deployment.name": "frontend"}),
        destination=Endpoint(namespace="shop", pod_name="payments-0"),
    )
    fields.update(overrides)
    return Flow(**fields)  # type: ignore[arg-type]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
