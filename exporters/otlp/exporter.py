"""The ``otlp`` exporter: OTLP over gRPC."""
from __future__ import annotations

from flowtel.lib.exporterhelper.otlp_exporter import OtlpExporter
from exporters.otlp.config import OtlpGrpcConfig
from exporters.otlp.transport import GrpcTransport
from flowtel.component import CreateSettings


class OtlpGrpcExporter(OtlpExporter):
    def __init__(self, settings: CreateSettings, config: OtlpGrpcConfig) -> None:
        self._transport = GrpcTransport(config, settings.id)
        super().__init__(settings, config, self._transport)

    def start(self) -> None:
        # Reads the TLS files: a wrong path is a start-up error, not a stream of failed sends.
        self._transport.open()
        super().start()
