"""Factory of the ``console`` exporter."""
from __future__ import annotations

from exporters.console.config import ConsoleConfig
from exporters.console.exporter import ConsoleExporter
from flowtel.component import CreateSettings, Factory, Kind


def create(settings: CreateSettings, config: ConsoleConfig) -> ConsoleExporter:
    return ConsoleExporter(settings, config)


FACTORY = Factory(type="console", kind=Kind.EXPORTER, config_class=ConsoleConfig, create=create, signals=("logs",))
