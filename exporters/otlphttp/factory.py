"""Factory of the ``otlphttp`` exporter."""
from __future__ import annotations

from exporters.otlphttp.config import OtlpHttpConfig
from exporters.otlphttp.exporter import OtlpHttpExporter
from flowtel.component import CreateSettings, ExporterFactory


def create(settings: CreateSettings, config: OtlpHttpConfig) -> OtlpHttpExporter:
    return OtlpHttpExporter(settings, config)


FACTORY = ExporterFactory(type="otlphttp", config_class=OtlpHttpConfig, create=create)
