"""Factory of the ``flowaggregate`` processor."""
from __future__ import annotations

from flowtel.component import CreateSettings, ProcessorFactory
from processors.flowaggregate.config import FlowAggregateConfig
from processors.flowaggregate.processor import FlowAggregateProcessor


def create(settings: CreateSettings, config: FlowAggregateConfig) -> FlowAggregateProcessor:
    return FlowAggregateProcessor(settings, config)


# Only flows are aggregated, so logs pipelines only.
FACTORY = ProcessorFactory(type="flowaggregate", config_class=FlowAggregateConfig, create=create, signals=("logs",))
