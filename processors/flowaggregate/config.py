"""Config of the ``flowaggregate`` processor."""
from __future__ import annotations

from pydantic import Field, field_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import Duration


class FlowAggregateConfig(ComponentConfig):
    window: Duration = Field(default=30.0, description="length of the fixed aggregation windows")
    max_keys: int = Field(default=100_000, ge=1, description="distinct keys held per window; further keys pass through unaggregated (counted)")
    l4: bool = Field(default=True, description="aggregate L3/L4 flows that are not drops")
    drops: bool = Field(default=True, description="aggregate dropped flows (kept apart by drop reason)")
    dns: bool = Field(default=False, description="aggregate L7 DNS flows too (by default they pass through)")

    @field_validator("window")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("window must be longer than 0")
        return v
