"""Config of the ``hubblemetrics`` connector."""
from __future__ import annotations

from pydantic import Field, field_validator

from connectors.hubblemetrics.options import OptionError
from flowtel.component import ComponentConfig
from flowtel.configtypes import Duration


class HubbleMetricsConfig(ComponentConfig):
    metrics: list[str] = Field(
        default_factory=lambda: ["flow", "drop", "tcp", "dns", "lost-events"],
        description="Hubble metric strings, NAME[:OPT[;OPT…]], e.g. 'dns:query;sourceContext=pod'",
    )
    interval: Duration = Field(default=10.0, gt=0, description="how often every series is emitted")
    # Without pod-deletion events a series cannot know its pod is gone; idle is the proxy.
    series_expiry: Duration = Field(default=300.0, ge=0, description="drop series with no update this long (0: never)")
    # Cilium's and Hubble's dashboards fill their $cluster variable from this series.
    version_info: bool = Field(default=True, description="emit cilium_version{version, revision, arch} = 1")
    max_series: int = Field(default=50_000, ge=1, le=5_000_000,
                            description="series kept; increments to new series beyond are counted, not kept")

    @field_validator("metrics")
    @classmethod
    def _valid_metrics(cls, value: list[str]) -> list[str]:
        # Build the handlers once here so a bad option is a config error naming the string.
        from connectors.hubblemetrics.connector import build_handlers

        try:
            build_handlers(value)
        except OptionError as exc:
            raise ValueError(str(exc)) from None
        return value
