"""Factory of the ``otlp`` exporter."""
from __future__ import annotations

from exporters.otlp.config import OtlpGrpcConfig
from exporters.otlp.exporter import OtlpGrpcExporter
from flowtel.component import CreateSettings, Factory, Kind


def create(settings: CreateSettings, config: OtlpGrpcConfig) -> OtlpGrpcExporter:
    return OtlpGrpcExporter(settings, config)


FACTORY = Factory(type="otlp", kind=Kind.EXPORTER, config_class=OtlpGrpcConfig, create=create)
