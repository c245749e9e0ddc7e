"""Factory of the ``prometheus`` exporter."""
from __future__ import annotations

from exporters.prometheus.config import PrometheusConfig
from exporters.prometheus.exporter import PrometheusExporter
from flowtel.component import CreateSettings, ExporterFactory


def create(settings: CreateSettings, config: PrometheusConfig) -> PrometheusExporter:
    return PrometheusExporter(settings, config)


FACTORY = ExporterFactory(type="prometheus", config_class=PrometheusConfig, create=create,
                  signals=("metrics",))
