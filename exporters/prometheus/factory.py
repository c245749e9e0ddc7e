"""Factory of the ``prometheus`` exporter."""
from __future__ import annotations

from exporters.prometheus.config import PrometheusConfig
from exporters.prometheus.exporter import PrometheusExporter
from flowtel.component import CreateSettings, Factory, Kind


def create(settings: CreateSettings, config: PrometheusConfig) -> PrometheusExporter:
    return PrometheusExporter(settings, config)


FACTORY = Factory(type="prometheus", kind=Kind.EXPORTER, config_class=PrometheusConfig, create=create,
                  signals=("metrics",))
