"""Factory of the ``ui`` extension."""
from __future__ import annotations

from extensions.ui.config import UiConfig
from extensions.ui.extension import UiExtension
from flowtel.component import CreateSettings, ExtensionFactory


def create(settings: CreateSettings, config: UiConfig) -> UiExtension:
    return UiExtension(settings, config)


FACTORY = ExtensionFactory(type="ui", config_class=UiConfig, create=create, signals=("logs",))
