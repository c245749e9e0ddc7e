"""The ``otlphttp`` exporter: OTLP/HTTP with protobuf bodies."""
from __future__ import annotations

from flowtel.lib.exporterhelper.otlp_exporter import OtlpExporter
from exporters.otlphttp.config import OtlpHttpConfig
from exporters.otlphttp.transport import HttpTransport
from flowtel.component import CreateSettings


class OtlpHttpExporter(OtlpExporter):
    def __init__(self, settings: CreateSettings, config: OtlpHttpConfig) -> None:
        self._transport = HttpTransport(config, settings.id)
        super().__init__(settings, config, self._transport)

    def start(self) -> None:
        # Loads the TLS files: a wrong path is a start-up error, not a stream of failed sends.
        self._transport.open()
        super().start()
