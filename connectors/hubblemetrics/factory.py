"""Factory of the ``hubblemetrics`` connector."""
from __future__ import annotations

from connectors.hubblemetrics.config import HubbleMetricsConfig
from connectors.hubblemetrics.connector import HubbleMetricsConnector
from flowtel.component import ConnectorFactory, Consumer, CreateSettings


def create(settings: CreateSettings, config: HubbleMetricsConfig, next_consumer: Consumer) -> HubbleMetricsConnector:
    return HubbleMetricsConnector(settings, config, next_consumer)


# Takes logs (flows) and feeds metrics pipelines.
FACTORY = ConnectorFactory(type="hubblemetrics", config_class=HubbleMetricsConfig, create=create, consumes="logs", emits="metrics")
