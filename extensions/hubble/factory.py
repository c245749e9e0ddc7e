"""Factory of the ``hubble`` extension."""
from __future__ import annotations

from extensions.hubble.config import HubbleConfig
from extensions.hubble.extension import HubbleExtension
from flowtel.component import CreateSettings, ExtensionFactory


def create(settings: CreateSettings, config: HubbleConfig) -> HubbleExtension:
    return HubbleExtension(settings, config)


FACTORY = ExtensionFactory(type="hubble", config_class=HubbleConfig, create=create, signals=("logs",))
