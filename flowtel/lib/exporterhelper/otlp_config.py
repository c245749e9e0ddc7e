"""Config keys shared by the ``otlp`` and ``otlphttp`` exporters, named as the Collector names them."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flowtel.lib.exporterhelper.flowlog_filter import FlowLogFilterConfig
from flowtel.lib.exporterhelper.otlp_encoding import LogBody
from flowtel.lib.metrics.series import Temporality
from flowtel.component import ComponentConfig
from flowtel.configtypes import Duration


class TLSConfig(ComponentConfig):
    insecure: bool = Field(default=False, description="gRPC only: plaintext, no TLS (otlphttp follows the URL scheme)")
    insecure_skip_verify: bool = Field(default=False, description="otlphttp only: do not verify the server certificate")
    ca_file: str = Field(default="", description="PEM CA bundle to verify the server (default: system roots)")
    cert_file: str = Field(default="", description="PEM client certificate for mutual TLS (with key_file)")
    key_file: str = Field(default="", description="PEM private key of cert_file")

    @model_validator(mode="after")
    def _pairs(self) -> "TLSConfig":
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together: set both for mutual TLS, or neither")
        if self.insecure and (self.ca_file or self.cert_file or self.insecure_skip_verify):
            raise ValueError("insecure: true turns TLS off, so ca_file/cert_file/key_file/insecure_skip_verify "
                             "would be ignored; remove them or set insecure: false")
        return self


class RetryConfig(ComponentConfig):
    enabled: bool = Field(default=True, description="retry transient failures; false drops a request on its first failure")
    initial_interval: Duration = Field(default=5.0, description="wait before the first retry")
    max_interval: Duration = Field(default=30.0, description="cap on the wait between retries")
    max_elapsed_time: Duration = Field(default=300.0, description="give a request up (counted) after this long; 0 retries forever")
    multiplier: float = Field(default=1.5, ge=1.0, description="growth of the wait per retry")
    randomization_factor: float = Field(default=0.5, ge=0.0, le=1.0, description="jitter: each wait is ±this fraction")

    @model_validator(mode="after")
    def _ordered(self) -> "RetryConfig":
        if self.enabled and self.initial_interval <= 0:
            raise ValueError("initial_interval must be more than 0 when retries are enabled")
        if self.max_interval < self.initial_interval:
            raise ValueError(f"max_interval ({self.max_interval}s) must not be less than initial_interval "
                             f"({self.initial_interval}s)")
        return self


class QueueConfig(ComponentConfig):
    enabled: bool = Field(default=True, description="queue requests and send them from a background thread")
    queue_size: int = Field(default=100, ge=1, description="requests the queue holds; more are dropped and counted")


class OtlpExporterConfig(FlowLogFilterConfig):
    """Keys common to both OTLP transports; ``endpoint`` is declared by each. The logs keys
    ``allow_list``, ``deny_list`` and ``field_mask`` come from :class:`FlowLogFilterConfig`."""

    tls: TLSConfig = Field(default_factory=TLSConfig)
    headers: dict[str, str] = Field(default_factory=dict, description="sent with every request (gRPC metadata or HTTP headers)")
    compression: Literal["gzip", "none"] = Field(default="gzip", description="request compression")
    timeout: Duration = Field(default=5.0, description="time limit of one send attempt")
    retry_on_failure: RetryConfig = Field(default_factory=RetryConfig)
    sending_queue: QueueConfig = Field(default_factory=QueueConfig)
    max_batch_size: int = Field(default=1000, ge=1, description="data points or log records per request at most")
    # Metrics (the exporter keeps the latest value of each series and sends them all periodically).
    export_interval: Duration = Field(default=10.0, description="how often every live metric series is sent")
    temporality: Temporality = Field(default="cumulative", description="cumulative or delta for sums")
    cardinality_limit: int = Field(default=100_000, ge=1, description="series per metric name; new ones beyond are refused and counted")
    series_ttl: Duration = Field(default=300.0, description="forget a series without a new point for this long; 0 never")
    # Logs.
    # Off by default: a gateway Collector usually scrapes the agent's /metrics for these already.
    self_telemetry: bool = Field(default=False, description="also send the agent's own counters as flowtel_component_*")
    log_body: LogBody = Field(default="map", description="Hubble flow object as an OTLP map, or as a JSON string")

    @field_validator("export_interval")
    @classmethod
    def _positive_interval(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("export_interval must be more than 0, e.g. '10s'")
        return value

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("timeout must be more than 0, e.g. '5s'")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or any(c.isspace() or c == ":" for c in name):
                raise ValueError(f"header name {name!r} is not a valid HTTP header or gRPC metadata key")
        return value
