"""Factory of the ``file`` exporter."""
from __future__ import annotations

from exporters.file.config import FileConfig
from exporters.file.exporter import FileExporter
from flowtel.component import CreateSettings, ExporterFactory


def create(settings: CreateSettings, config: FileConfig) -> FileExporter:
    return FileExporter(settings, config)


FACTORY = ExporterFactory(type="file", config_class=FileConfig, create=create, signals=("logs",))
