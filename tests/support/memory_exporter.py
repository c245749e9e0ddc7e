"""An exporter that keeps what it is given, for in-process pipeline tests to read, and the
component registry with it added under the type ``memory``."""
from __future__ import annotations

import threading

from flowtel.component import ComponentConfig, CreateSettings, Exporter, ExporterFactory, Factory, Kind
from flowtel.records import MetricPoint, Record
from flowtel.registry import factories_by_kind


class MemoryExporter(Exporter):
    """Every record of every batch, in arrival order."""

    def __init__(self, settings: CreateSettings, config: ComponentConfig) -> None:
        super().__init__(settings)
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def consume(self, batch: list[Record]) -> None:
        with self._lock:
            self.records.extend(batch)

    def last_values(self) -> dict[str, float]:
        """Each metric's latest value (any series)."""
        with self._lock:
            return {r.name: r.value for r in self.records if isinstance(r, MetricPoint)}

    def last_point(self, name: str) -> MetricPoint:
        with self._lock:
            return [r for r in self.records if isinstance(r, MetricPoint) and r.name == name][-1]


def factories_with_memory() -> dict[Kind, dict[str, Factory]]:
    """The registry's factories plus ``memory``, without changing the registry itself."""
    out = factories_by_kind()
    out[Kind.EXPORTER] = {**out[Kind.EXPORTER], "memory": ExporterFactory("memory", ComponentConfig, MemoryExporter)}
    return out
