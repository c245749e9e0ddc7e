"""OTLP over gRPC through opentelemetry-exporter-otlp's gRPC exporter classes.

Metrics go through the SDK's ``OTLPMetricExporter`` (it encodes the ``MetricsData`` with
the SDK's encoder); flow logs, encoded by flowtel (:mod:`flowtel.lib.exporterhelper.otlp_encoding`,
several times cheaper per record than the SDK's log data model), go through the SDK's
``OTLPLogExporter`` with its translation step given the ready request. Both therefore share
one implementation of the channel, TLS credentials, metadata, gzip, deadlines and the
reconnect after ``UNAVAILABLE``.

What the SDK classes do inside one ``export`` call (opentelemetry-exporter-otlp-proto-grpc
1.45, ``exporter.py``): one deadline of ``timeout`` for the whole call; a failure whose code
is in ``retryable_error_codes`` is resent after a fixed 1 s, 2 s, … (±20 %) while the wait
fits the deadline; after UNAVAILABLE the channel is replaced (a fresh connection). flowtel
turns those in-call resends off, so that one ``export`` call is one RPC and every retry is
``retry_on_failure``'s, with its configured intervals: a hidden second backoff layer would
delay recovery after an outage by up to a second more and overflow small queues with data
produced after the backend returned. The SDK has no switch for this (an empty
``retryable_error_codes`` means its default set), so the set given holds only ``OK``, a
code no failed call has.

The call returns only SUCCESS or FAILURE, so the service stub is wrapped to see each
call's response (its ``partial_success``, which the SDK ignores) and error (its code and
``grpc-status-details-bin``), and the outcome is judged as the Collector's ``otlp``
exporter judges it: UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, ABORTED, OUT_OF_RANGE and
DATA_LOSS are transient; RESOURCE_EXHAUSTED is transient only with a RetryInfo
(throttling; without one it is e.g. a message over the size limit), whose delay the
sending queue waits; every other code is permanent. flowtel's sending queue
(:mod:`flowtel.lib.exporterhelper.sending`) retries transient failures around these calls.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.sdk.metrics.export import MetricsData
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.metrics.export import MetricExportResult

from flowtel.lib.exporterhelper.otlp_encoding import FLOWTEL_VERSION
from flowtel.lib.exporterhelper.sending import Request, SendResult
from flowtel.lib.exporterhelper.metrics_data import preferred_temporality
from exporters.otlp.config import OtlpGrpcConfig
from flowtel.errors import StartError

RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS,
})

# See the module docstring: no failed call has OK, so the SDK never resends within a call.
_NO_IN_CALL_RESENDS = frozenset({grpc.StatusCode.OK})

try:
    _SDK_VERSION = version("opentelemetry-exporter-otlp-proto-grpc")
except PackageNotFoundError:  # pragma: no cover - the import above would have failed first
    _SDK_VERSION = "unknown"


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
    """None for plaintext; else TLS with the configured CA (or system roots) and client pair.

    Built here rather than from the SDK exporter's ``certificate_file`` handling, which logs
    an unreadable file and carries on without it: here it stops the agent at start."""
    tls = config.tls
    if tls.insecure:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "ca_file", exporter_id) if tls.ca_file else None,
        private_key=_read(tls.key_file, "key_file", exporter_id) if tls.key_file else None,
        certificate_chain=_read(tls.cert_file, "cert_file", exporter_id) if tls.cert_file else None,
    )


class _Calls:
    """Stands in for the SDK exporter's service stub: forwards ``Export`` and remembers the
    number of calls and the last call's response or error."""

    def __init__(self) -> None:
        self.stub: Any = None
        self.count = 0
        self.response: Any = None
        self.error: grpc.RpcError | None = None

    def reset(self) -> None:
        self.count, self.response, self.error = 0, None, None

    def Export(self, request: Any, metadata: Any = None, timeout: float | None = None) -> Any:  # noqa: N802 (the stub's name)
        self.count += 1
        try:
            response = self.stub.Export(request=request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as error:
            self.response, self.error = None, error
            raise
        self.response, self.error = response, None
        return response


class _Observed:
    """Mixin for the SDK's gRPC exporter classes: wraps the stub on every (re)connect."""

    _client: Any
    calls: _Calls

    def _initialize_channel_and_stub(self) -> None:
        # The SDK calls this from __init__ and again after UNAVAILABLE (a fresh channel):
        # keep one _Calls across both, pointing at the current stub.
        super()._initialize_channel_and_stub()  # type: ignore[misc]  # the SDK's private method, untyped
        calls = self.__dict__.get("calls")
        if calls is None:
            calls = self.calls = _Calls()
        calls.stub = self._client
        self._client = calls


class _MetricExporter(_Observed, OTLPMetricExporter):
    pass


class _LogExporter(_Observed, OTLPLogExporter):
    """The SDK's log exporter, given requests flowtel already encoded."""

    def _translate_data(self, data: ExportLogsServiceRequest) -> ExportLogsServiceRequest:  # type: ignore[override]  # the SDK types it for its SDK records; flowtel hands it encoded requests
        return data

    def _count_data(self, data: ExportLogsServiceRequest) -> int:  # type: ignore[override]  # the SDK types it for its SDK records; flowtel hands it encoded requests
        return sum(len(sl.log_records) for rl in data.resource_logs for sl in rl.scope_logs)


class GrpcTransport:
    def __init__(self, config: OtlpGrpcConfig, exporter_id: str) -> None:
        self._config = config
        self._exporter_id = exporter_id
        self._metrics: _MetricExporter | None = None
        self._logs: _LogExporter | None = None

    def open(self) -> None:
        """Create the SDK exporters (their channels connect lazily); TLS files are read now,
        so a bad path stops start-up."""
        config = self._config
        retry = config.retry_on_failure
        options = (
            # After an outage the channel's own reconnect backoff (up to 120 s by default)
            # would outlast flowtel's retries; keep it within retry_on_failure's bounds.
            ("grpc.initial_reconnect_backoff_ms", max(100, int(retry.initial_interval * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(retry.max_interval * 1000))),
            ("grpc.primary_user_agent", f"flowtel/{FLOWTEL_VERSION} OTel-OTLP-Exporter-Python/{_SDK_VERSION}"),
        )
        credentials = channel_credentials(config, self._exporter_id)
        common: dict[str, Any] = dict(
            endpoint=config.endpoint,
            insecure=credentials is None,
            credentials=credentials,
            # gRPC metadata keys are lowercase. With none configured the SDK falls back to
            # OTEL_EXPORTER_OTLP_(METRICS_|LOGS_)HEADERS, as every OTel SDK does.
            headers=tuple((k.lower(), v) for k, v in config.headers.items()) or None,
            timeout=config.timeout,
            compression=grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression,
            channel_options=options,
            retryable_error_codes=_NO_IN_CALL_RESENDS,
        )
        self._metrics = _MetricExporter(preferred_temporality=preferred_temporality(config.temporality), **common)
        self._logs = _LogExporter(**common)

    def send(self, request: Request, timeout: float) -> SendResult:
        """One ``export`` call; the SDK exporter's deadline is the configured ``timeout``."""
        if self._metrics is None or self._logs is None:
            self.open()
        assert self._metrics is not None and self._logs is not None
        exporter: _MetricExporter | _LogExporter = self._metrics if request.signal == "metrics" else self._logs
        calls = exporter.calls
        calls.reset()
        try:
            if isinstance(request.payload, MetricsData):
                ok = self._metrics.export(request.payload) is MetricExportResult.SUCCESS
            else:
                payload = ExportLogsServiceRequest.FromString(request.payload)
                ok = self._logs.export(payload) is LogRecordExportResult.SUCCESS
        except Exception as exc:  # e.g. the SDK's encoder refusing a point: this request can never succeed
            return SendResult(ok=False, retryable=False, attempts=max(1, calls.count),
                              message=f"the SDK exporter failed: {type(exc).__name__}: {exc}")
        attempts = max(1, calls.count)
        if ok:
            partial = getattr(calls.response, "partial_success", None)
            if partial is None:
                return SendResult(ok=True, attempts=attempts)
            rejected = partial.rejected_data_points if request.signal == "metrics" else partial.rejected_log_records
            return SendResult(ok=True, rejected=int(rejected), message=partial.error_message, attempts=attempts)
        if calls.error is None:
            return SendResult(ok=False, retryable=False, attempts=attempts,
                              message="the SDK exporter refused the request (shut down)")
        result = judge(calls.error)
        result.attempts = attempts
        return result

    def close(self) -> None:
        for exporter in (self._metrics, self._logs):
            if exporter is not None:
                exporter.shutdown()
        self._metrics = self._logs = None


def judge(error: grpc.RpcError) -> SendResult:
    """A failed call, judged as the Collector's otlp exporter judges it."""
    code = error.code()
    message = f"{code.name}: {error.details()}"
    throttle = _retry_delay(error)
    if code in RETRYABLE:
        return SendResult(ok=False, retryable=True, throttle=throttle, message=message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and throttle is not None:
        return SendResult(ok=False, retryable=True, throttle=throttle, message=message)
    return SendResult(ok=False, retryable=False, message=message)


def _retry_delay(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay from the status details (``grpc-status-details-bin``, where the
    Collector and grpc-go servers put it), if the server sent one."""
    try:
        trailers = error.trailing_metadata() or ()
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
