"""Factory of the ``otlp`` exporter."""
from __future__ import annotations

from exporters.otlp.config import OtlpGrpcConfig
from exporters.otlp.exporter import OtlpGrpcExporter
from flowtel.component import CreateSettings, ExporterFactory


def create(settings: CreateSettings, config: OtlpGrpcConfig) -> OtlpGrpcExporter:
    return OtlpGrpcExporter(settings, config)


FACTORY = ExporterFactory(type="otlp", config_class=OtlpGrpcConfig, create=create)
