"""Config of the ``otlphttp`` exporter: the Collector's ``otlphttp`` exporter keys."""
from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from flowtel.lib.exporterhelper.otlp_config import OtlpExporterConfig


def _check_url(value: str, key: str) -> str:
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key} must be an http:// or https:// URL such as http://otel-collector:4318, got {value!r}")
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"{key} has an invalid port: {value!r}") from exc
    return value


class OtlpHttpConfig(OtlpExporterConfig):
    endpoint: str = Field(default="", description="base URL; /v1/metrics and /v1/logs are appended")
    metrics_endpoint: str = Field(default="", description="full URL for metrics, instead of endpoint + /v1/metrics")
    logs_endpoint: str = Field(default="", description="full URL for logs, instead of endpoint + /v1/logs")

    @field_validator("endpoint", "metrics_endpoint", "logs_endpoint")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        return _check_url(value, info.field_name or "endpoint") if value else value

    @model_validator(mode="after")
    def _complete(self) -> "OtlpHttpConfig":
        if not self.endpoint and not (self.metrics_endpoint and self.logs_endpoint):
            raise ValueError("set endpoint (e.g. http://otel-collector:4318), or both metrics_endpoint and logs_endpoint")
        if self.tls.insecure:
            raise ValueError("tls.insecure applies to gRPC only; for otlphttp the URL scheme decides "
                             "(http:// is plaintext, https:// is TLS)")
        tls_keys = self.tls.ca_file or self.tls.cert_file or self.tls.insecure_skip_verify
        if tls_keys and not any(u.startswith("https://") for u in self.urls().values()):
            raise ValueError("tls settings are given but every URL is http:// (plaintext); use https://")
        return self

    def urls(self) -> dict[str, str]:
        base = self.endpoint.rstrip("/")
        return {
            "metrics": self.metrics_endpoint or f"{base}/v1/metrics",
            "logs": self.logs_endpoint or f"{base}/v1/logs",
        }
