"""Factory of the ``servicegraph`` connector."""
from __future__ import annotations

from connectors.servicegraph.config import ServiceGraphConfig
from connectors.servicegraph.connector import ServiceGraphConnector
from flowtel.component import ConnectorFactory, Consumer, CreateSettings


def create(settings: CreateSettings, config: ServiceGraphConfig, next_consumer: Consumer) -> ServiceGraphConnector:
    return ServiceGraphConnector(settings, config, next_consumer)


# A connector takes logs (flows) and feeds metrics pipelines: both signals are valid places.
FACTORY = ConnectorFactory(type="servicegraph", config_class=ServiceGraphConfig, create=create, consumes="logs", emits="metrics")
