"""The component registry: one line per component type, as in the Collector's builder.

A factory module is imported only when a config names its type (or :func:`all_factories`
is asked for every one): an agent whose config has no OTLP exporter does not load gRPC and
the OpenTelemetry SDK, one without k8sattributes not the Kubernetes client (tens of MB of
resident memory each; docs/performance.md).
"""
from __future__ import annotations

import importlib
from typing import Iterator

from flowtel.component import Factory, Kind

# (kind, type, module whose FACTORY it is)
_REGISTRY: tuple[tuple[Kind, str, str], ...] = (
    (Kind.RECEIVER, "ebpf", "receiver.ebpf.factory"),
    (Kind.RECEIVER, "procfs", "receiver.procfs.factory"),
    (Kind.RECEIVER, "fqdnpolicy", "receiver.fqdnpolicy.factory"),
    (Kind.PROCESSOR, "k8sattributes", "processors.k8sattributes.factory"),
    (Kind.PROCESSOR, "flowaggregate", "processors.flowaggregate.factory"),
    (Kind.EXPORTER, "console", "exporters.console.factory"),
    (Kind.EXPORTER, "file", "exporters.file.factory"),
    (Kind.EXPORTER, "otlp", "exporters.otlp.factory"),
    (Kind.EXPORTER, "otlphttp", "exporters.otlphttp.factory"),
    (Kind.EXPORTER, "prometheus", "exporters.prometheus.factory"),
    (Kind.CONNECTOR, "servicegraph", "connectors.servicegraph.factory"),
    (Kind.CONNECTOR, "hubblemetrics", "connectors.hubblemetrics.factory"),
    (Kind.EXTENSION, "flows", "extensions.flows.factory"),
    (Kind.EXTENSION, "health_check", "extensions.health_check.factory"),
    (Kind.EXTENSION, "ui", "extensions.ui.factory"),
)


def _load(module: str, kind: Kind, ctype: str) -> Factory:
    factory: Factory = importlib.import_module(module).FACTORY
    if factory.kind != kind or factory.type != ctype:
        raise RuntimeError(f"{module}.FACTORY is {factory.kind.value}/{factory.type}, registered as "
                           f"{kind.value}/{ctype}")
    return factory


class LazyFactories(dict):  # type: ignore[type-arg]  # dict[str, Factory], values loaded on first access
    """The factories of one kind by type; a factory's module is imported when it is first read.
    Membership and the list of types need no import. Assigning a Factory (tests) works as on a dict."""

    def __init__(self, kind: Kind, modules: dict[str, str]) -> None:
        super().__init__({ctype: None for ctype in modules})
        self._kind = kind
        self._modules = modules

    def __getitem__(self, ctype: str) -> Factory:
        value = super().__getitem__(ctype)
        if value is None:
            value = _load(self._modules[ctype], self._kind, ctype)
            super().__setitem__(ctype, value)
        return value  # type: ignore[no-any-return]

    def get(self, ctype: str, default: Factory | None = None) -> Factory | None:  # type: ignore[override]
        return self[ctype] if ctype in self else default

    def values(self) -> list[Factory]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> list[tuple[str, Factory]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))


def all_factories() -> list[Factory]:
    """Every registered factory (imports every component's factory module)."""
    return [_load(module, kind, ctype) for kind, ctype, module in _REGISTRY]


def factories_by_kind() -> dict[Kind, dict[str, Factory]]:
    by_kind: dict[Kind, dict[str, str]] = {kind: {} for kind in Kind}
    for kind, ctype, module in _REGISTRY:
        by_kind[kind][ctype] = module
    return {kind: LazyFactories(kind, modules) for kind, modules in by_kind.items()}
