"""``cilium_version``: the build-info series Cilium's and Hubble's Grafana dashboards key on.

Their ``$cluster`` variable is ``label_values(cilium_version, cluster)`` (cilium/cilium
``install/kubernetes/cilium/files/hubble/dashboards/*.json``): without a ``cilium_version``
series the variable is empty and every panel filtered by it stays empty on a cluster without
Cilium. The ``cluster`` label itself is the scrape's (a target label or an external label, as
on Azure Managed Prometheus), on this series as on every other. The value is 1; ``version`` is
flowtel's, so nobody reads it as a Cilium release: ``flowtel-<version>``.
"""
from __future__ import annotations

import importlib.metadata
import platform

from flowtel.records import MetricKind, MetricPoint

NAME = "cilium_version"
DESCRIPTION = "Build information, as Cilium's cilium_version (flowtel's version; value 1)"


def _version() -> str:
    try:
        return importlib.metadata.version("flowtel")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def version_point(now_ns: int) -> MetricPoint:
    labels = {"version": f"flowtel-{_version()}", "revision": "", "arch": platform.machine() or "unknown"}
    return MetricPoint(NAME, 1, MetricKind.GAUGE, now_ns, labels, "1", DESCRIPTION)
