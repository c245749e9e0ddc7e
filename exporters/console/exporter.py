"""The ``console`` exporter: writes each flow-log record as one line to a text stream."""
from __future__ import annotations

import sys
from typing import TextIO

from exporters.console.config import ConsoleConfig
from flowtel.lib.hubble import convert, printer
from flowtel.component import CreateSettings, Exporter
from flowtel.records import Record



class ConsoleExporter(Exporter):
    def __init__(self, settings: CreateSettings, config: ConsoleConfig, stream: TextIO | None = None) -> None:
        super().__init__(settings)
        self.config = config
        # None means "sys.stdout at write time", so a redirected stdout is honoured.
        self._stream = stream

    def _lines(self, batch: list[Record]) -> list[str]:
        if self.config.verbosity == "json":
            return [convert.envelope_line(r) for r in batch]
        color = self.config.color
        return [printer.record_compact_line(r, color) for r in batch]

    def consume(self, batch: list[Record]) -> None:
        if not batch:
            return
        # Format the whole batch before writing, so a bad record writes nothing half-way,
        # and write once: the cost is per batch, not per record.
        lines = self._lines(batch)
        lines.append("")
        (self._stream or sys.stdout).write("\n".join(lines))

    def flush(self) -> None:
        (self._stream or sys.stdout).flush()
