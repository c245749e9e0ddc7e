"""Factory of the ``console`` exporter."""
from __future__ import annotations

from exporters.console.config import ConsoleConfig
from exporters.console.exporter import ConsoleExporter
from flowtel.component import CreateSettings, ExporterFactory


def create(settings: CreateSettings, config: ConsoleConfig) -> ConsoleExporter:
    return ConsoleExporter(settings, config)


FACTORY = ExporterFactory(type="console", config_class=ConsoleConfig, create=create, signals=("logs",))
