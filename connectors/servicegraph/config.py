"""Config of the ``servicegraph`` connector."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowtel.component import ComponentConfig
from flowtel.configtypes import Duration


class ServiceGraphConfig(ComponentConfig):
    granularity: Literal["workload", "pod"] = Field(
        default="workload", description="graph nodes are workloads (falling back to pods) or always pods"
    )
    # As the Collector's servicegraph connector: 0 emits after every batch of flows.
    metrics_flush_interval: Duration = Field(default=15.0, description="how often the edges are emitted as metrics")
    expire_after: Duration = Field(default=600.0, description="stop emitting edges idle this long (0: never)")
    max_edges: int = Field(default=10_000, ge=1, le=1_000_000, description="edges kept; flows beyond are counted, not graphed")
