"""Config of the ``otlp`` (gRPC) exporter: the Collector's ``otlp`` exporter keys."""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from flowtel.lib.exporterhelper.otlp_config import OtlpExporterConfig


class OtlpGrpcConfig(OtlpExporterConfig):
    endpoint: str = Field(description="host:port of the OTLP gRPC receiver, e.g. otel-collector:4317")

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must name the receiver as host:port, e.g. localhost:4317")
        if value.startswith(("http://", "https://")):
            raise ValueError(
                f"a gRPC endpoint is host:port without a scheme (got {value!r}); use tls.insecure: true "
                "for plaintext, or the otlphttp exporter for an http(s):// URL"
            )
        return value

    @model_validator(mode="after")
    def _no_skip_verify(self) -> "OtlpGrpcConfig":
        if self.tls.insecure_skip_verify:
            raise ValueError(
                "tls.insecure_skip_verify is not available for gRPC (grpc-python always verifies the "
                "server): set tls.ca_file to the CA that signed the server's certificate, or "
                "tls.insecure: true for plaintext"
            )
        return self
