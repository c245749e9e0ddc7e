"""Factory of the ``flows`` extension."""
from __future__ import annotations

from extensions.flows.config import FlowsConfig
from extensions.flows.extension import FlowsExtension
from flowtel.component import CreateSettings, ExtensionFactory


def create(settings: CreateSettings, config: FlowsConfig) -> FlowsExtension:
    return FlowsExtension(settings, config)


FACTORY = ExtensionFactory(type="flows", config_class=FlowsConfig, create=create, signals=("logs",))
