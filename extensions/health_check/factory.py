"""Factory of the ``health_check`` extension."""
from __future__ import annotations

from extensions.health_check.config import HealthCheckConfig
from extensions.health_check.extension import HealthCheckExtension
from flowtel.component import CreateSettings, ExtensionFactory


def create(settings: CreateSettings, config: HealthCheckConfig) -> HealthCheckExtension:
    return HealthCheckExtension(settings, config)


# Extensions sit in no pipeline: signals is empty.
FACTORY = ExtensionFactory(type="health_check", config_class=HealthCheckConfig, create=create)
