"""Factory of the ``k8sattributes`` processor."""
from __future__ import annotations

from flowtel.component import CreateSettings, ProcessorFactory
from processors.k8sattributes.access import preflight
from processors.k8sattributes.config import K8sAttributesConfig
from processors.k8sattributes.processor import K8sAttributesProcessor


def create(settings: CreateSettings, config: K8sAttributesConfig) -> K8sAttributesProcessor:
    return K8sAttributesProcessor(settings, config)


# Only flows have addresses to name, so logs pipelines only.
FACTORY = ProcessorFactory(type="k8sattributes", config_class=K8sAttributesConfig, create=create, signals=("logs",), preflight=preflight)
