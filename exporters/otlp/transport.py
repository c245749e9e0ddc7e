"""OTLP over gRPC: the ``Export`` methods of opentelemetry-proto's services on a grpcio channel.

Requests are already serialized, so the channel's methods are created without a request
serializer and send the queued bytes as they are. Status codes are judged as the
Collector's otlp exporter judges them: UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, ABORTED,
OUT_OF_RANGE and DATA_LOSS are transient; RESOURCE_EXHAUSTED is transient only when the
server sends a RetryInfo (throttling; otherwise it is e.g. a message over the size limit);
everything else is permanent.
"""
from __future__ import annotations

from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

from exporters.common.sending import Request, SendResult
from exporters.otlp.config import OtlpGrpcConfig
from flowtel.errors import StartError

_RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS,
})


def _method(module: object, service: str, response: type) -> tuple[str, type]:
    full_name = module.DESCRIPTOR.services_by_name[service].full_name  # type: ignore[attr-defined]
    return f"/{full_name}/Export", response


_METHODS = {
    "metrics": _method(metrics_service_pb2, "MetricsService", metrics_service_pb2.ExportMetricsServiceResponse),
    "logs": _method(logs_service_pb2, "LogsService", logs_service_pb2.ExportLogsServiceResponse),
}


def _read(path: str, key: str, exporter_id: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartError(
            exporter_id,
            f"cannot read tls.{key} {path}: {exc.strerror or exc}",
            "mount the certificate secret at that path, or correct the path in the config",
        ) from exc


def channel_credentials(config: OtlpGrpcConfig, exporter_id: str) -> grpc.ChannelCredentials | None:
    """None for plaintext; else TLS with the configured CA (or system roots) and client pair."""
    tls = config.tls
    if tls.insecure:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "ca_file", exporter_id) if tls.ca_file else None,
        private_key=_read(tls.key_file, "key_file", exporter_id) if tls.key_file else None,
        certificate_chain=_read(tls.cert_file, "cert_file", exporter_id) if tls.cert_file else None,
    )


class GrpcTransport:
    def __init__(self, config: OtlpGrpcConfig, exporter_id: str) -> None:
        self._config = config
        self._exporter_id = exporter_id
        self._metadata = tuple((k.lower(), v) for k, v in config.headers.items())
        self._compression = grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression
        self._channel: grpc.Channel | None = None
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable] = {}

    def open(self) -> None:
        """Create the channel (lazy to connect); TLS files are read now, so a bad path stops start-up."""
        retry = self._config.retry_on_failure
        options = [
            # After an outage the channel's own reconnect backoff (up to 120 s by default)
            # would outlast flowtel's retries; keep it within retry_on_failure's bounds.
            ("grpc.initial_reconnect_backoff_ms", max(100, int(retry.initial_interval * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(retry.max_interval * 1000))),
            ("grpc.primary_user_agent", "flowtel"),
        ]
        credentials = channel_credentials(self._config, self._exporter_id)
        target = self._config.endpoint
        if credentials is None:
            channel = grpc.insecure_channel(target, options=options, compression=self._compression)
        else:
            channel = grpc.secure_channel(target, credentials, options=options, compression=self._compression)
        self._channel = channel
        self._calls = {
            signal: channel.unary_unary(path, request_serializer=None, response_deserializer=response.FromString)
            for signal, (path, response) in _METHODS.items()
        }

    def send(self, request: Request, timeout: float) -> SendResult:
        if self._channel is None:
            self.open()
        call = self._calls[request.signal]
        try:
            response = call(request.payload, timeout=timeout, metadata=self._metadata,
                            compression=self._compression)
        except grpc.RpcError as error:
            return _judge(error)
        partial = response.partial_success
        rejected = partial.rejected_data_points if request.signal == "metrics" else partial.rejected_log_records
        return SendResult(ok=True, rejected=int(rejected), message=partial.error_message)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def _judge(error: grpc.RpcError) -> SendResult:
    code = error.code()  # type: ignore[attr-defined]
    message = f"{code.name}: {error.details()}"  # type: ignore[attr-defined]
    throttle = _retry_delay(error)
    if code in _RETRYABLE:
        return SendResult(ok=False, retryable=True, throttle=throttle, message=message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and throttle is not None:
        return SendResult(ok=False, retryable=True, throttle=throttle, message=message)
    return SendResult(ok=False, retryable=False, message=message)


def _retry_delay(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay from the status details, if the server sent one."""
    try:
        trailers = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:
        return None
    for key, value in trailers:
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status()
        status.ParseFromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None
