"""OTLP/HTTP (protobuf bodies) through opentelemetry-exporter-otlp's HTTP exporter classes.

Metrics go through the SDK's ``OTLPMetricExporter`` (it encodes the ``MetricsData`` with
the SDK's encoder); flow logs, encoded by flowtel (:mod:`flowtel.lib.exporterhelper.otlp_encoding`,
several times cheaper per record than the SDK's log data model), go through the SDK's
``OTLPLogExporter``'s HTTP client as ready request bodies. Both share the SDK's handling of
gzip, headers, keep-alive connections (a requests ``Session``) and in-call retries.

What the SDK classes do inside one ``export`` call (opentelemetry-exporter-otlp-common,
``http.py``): a deadline of ``timeout`` for the whole call; 2xx/3xx is success; 429, 502,
503 and 504 and connection errors are resent after 1 s, 2 s, … (±20 %), or after the
server's ``Retry-After``, while the wait fits the deadline (a connection error is first
resent once at once: a stale kept-alive connection); everything else fails at once. Its
result says only success or failure, so the exporters are given a transport (the
``_transport`` keyword their constructors declare for this) that wraps requests' and
remembers each response; the outcome is judged from it as the Collector's ``otlphttp``
exporter judges it: 429/502/503/504 and connection errors are transient and their
``Retry-After`` is honoured by the sending queue; every other status is permanent; a 2xx
protobuf body may carry a partial success, whose rejected items are counted as failed.
Each resend inside a call counts in ``send_retries``.
"""
from __future__ import annotations

import logging
import ssl
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import requests
from google.rpc import status_pb2
from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport
from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
from opentelemetry.exporter.otlp.common.http import _extract_retry_after
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.sdk.metrics.export import MetricExportResult

from flowtel.lib.exporterhelper.metrics_data import preferred_temporality
from flowtel.lib.exporterhelper.otlp_encoding import FLOWTEL_VERSION
from flowtel.lib.exporterhelper.sending import Request, SendResult
from exporters.otlphttp.config import OtlpHttpConfig
from flowtel.errors import StartError

RETRYABLE = frozenset({429, 502, 503, 504})
_RESPONSES: dict[str, type[ExportMetricsServiceResponse] | type[ExportLogsServiceResponse]] = {
    "metrics": ExportMetricsServiceResponse, "logs": ExportLogsServiceResponse}
# The SDK's HTTP exporters log every failed and retried call; during an outage that is a
# line a second. The sending queue already reports losses (rate-limited), so the SDK's own
# lines are rate-limited the same way: each message template once every 10 s.
_SDK_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.metric_exporter",
                "opentelemetry.exporter.otlp.proto.http._log_exporter")

try:
    _SDK_VERSION = version("opentelemetry-exporter-otlp-proto-http")
except PackageNotFoundError:  # pragma: no cover - the import above would have failed first
    _SDK_VERSION = "unknown"


class _RateLimit(logging.Filter):
    def __init__(self, every: float) -> None:
        super().__init__()
        self._every = every
        self._last: dict[object, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(record.msg, -1e9) < self._every:
                return False
            self._last[record.msg] = now
        return True


def _quiet_sdk_loggers() -> None:
    for name in _SDK_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RateLimit) for f in logger.filters):
            logger.addFilter(_RateLimit(10.0))


def check_tls_files(config: OtlpHttpConfig, exporter_id: str) -> None:
    """Load the TLS files once at start, so a bad path or a bad PEM stops start-up with the
    reason rather than failing every send (requests would only read them per request)."""
    tls = config.tls
    if not (tls.ca_file or tls.cert_file):
        return
    try:
        context = ssl.create_default_context(cafile=tls.ca_file or None)
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise StartError(
            exporter_id,
            f"cannot load the TLS files (ca_file={tls.ca_file!r}, cert_file={tls.cert_file!r}, "
            f"key_file={tls.key_file!r}): {getattr(exc, 'strerror', None) or exc}",
            "mount the certificate secret at those paths (PEM), or correct the paths in the config",
        ) from exc


class _Session(requests.Session):
    """requests' Session, except that a configured ``tls.ca_file`` or
    ``tls.insecure_skip_verify`` wins over ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``.

    requests merges those environment variables into every request *over* the session's
    ``verify`` (requests issue 3829), so on a node that sets them (many base images do) the
    configured CA would be ignored and the private backend's certificate refused. Proxies
    from the environment (``HTTPS_PROXY``, ``NO_PROXY``) still apply, as in the Collector."""

    def __init__(self, configured_verify: bool) -> None:
        super().__init__()
        self._configured_verify = configured_verify

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> dict[str, Any]:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self._configured_verify:
            settings["verify"] = self.verify
        return settings


class _Observed(BaseHTTPTransport):
    """requests' transport for the SDK exporters, remembering the number of requests made
    and the last result."""

    def __init__(self, inner: RequestsHTTPTransport) -> None:
        self._inner = inner
        self.count = 0
        self.last: BaseHTTPResult | None = None

    def reset(self) -> None:
        self.count, self.last = 0, None

    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                timeout: float | None = None, data: bytes | None = None) -> BaseHTTPResult:
        self.count += 1
        self.last = self._inner.request(method, url, headers=headers, timeout=timeout, data=data)
        return self.last

    def close(self) -> None:
        self._inner.close()

    def is_connection_error(self, exception: Exception | None) -> bool:
        return self._inner.is_connection_error(exception)


class _LogExporter(OTLPLogExporter):
    """The SDK's HTTP log exporter, given request bodies flowtel already encoded."""

    def export_serialized(self, payload: bytes) -> bool:
        if self._shutdown:
            return False
        return self._client.export(payload).success


class HttpTransport:
    def __init__(self, config: OtlpHttpConfig, exporter_id: str) -> None:
        self._config = config
        self._exporter_id = exporter_id
        self._metrics: OTLPMetricExporter | None = None
        self._logs: _LogExporter | None = None
        self._observed: dict[str, _Observed] = {}

    def open(self) -> None:
        """Create the SDK exporters; TLS files are checked now, so a bad path stops start-up."""
        config = self._config
        check_tls_files(config, self._exporter_id)
        _quiet_sdk_loggers()
        tls = config.tls
        verify: bool | str = False if tls.insecure_skip_verify else (tls.ca_file or True)
        cert = (tls.cert_file, tls.key_file) if tls.cert_file else None
        configured = bool(tls.insecure_skip_verify or tls.ca_file)
        self._observed = {
            signal: _Observed(RequestsHTTPTransport(verify=verify, cert=cert, session=_Session(configured)))
            for signal in ("metrics", "logs")
        }
        common: dict[str, Any] = dict(
            # Our headers win over the SDK's (and over OTEL_EXPORTER_OTLP_*HEADERS, which the
            # SDK still applies for names not configured here).
            headers={"user-agent": f"flowtel/{FLOWTEL_VERSION} OTel-OTLP-Exporter-Python/{_SDK_VERSION}",
                     **config.headers},
            timeout=config.timeout,
            compression=Compression.Gzip if config.compression == "gzip" else Compression.NoCompression,
        )
        urls = config.urls()
        self._metrics = OTLPMetricExporter(endpoint=urls["metrics"], _transport=self._observed["metrics"],
                                           preferred_temporality=preferred_temporality(config.temporality),
                                           **common)
        self._logs = _LogExporter(endpoint=urls["logs"], _transport=self._observed["logs"], **common)

    def send(self, request: Request, timeout: float) -> SendResult:
        """One ``export`` call; the SDK exporter's deadline is the configured ``timeout``."""
        if self._metrics is None or self._logs is None:
            self.open()
        assert self._metrics is not None and self._logs is not None
        observed = self._observed[request.signal]
        observed.reset()
        if request.signal == "metrics":
            ok = self._metrics.export(request.payload) is MetricExportResult.SUCCESS  # type: ignore[arg-type]  # metrics requests carry MetricsData
        else:
            ok = self._logs.export_serialized(request.payload)  # type: ignore[arg-type]  # logs requests carry serialized bytes
        attempts = max(1, observed.count)
        last = observed.last
        if ok:
            result = _partial_success(request.signal, last)
        elif last is None:
            # Refused before anything was sent: the SDK could not encode it, or the request is
            # over its max_request_size (64 MiB), or the exporter is shut down. Sending it
            # again cannot help.
            result = SendResult(ok=False, retryable=False,
                                message="the SDK exporter did not send the request (see its log line)")
        elif last.status_code is None:
            retryable = observed.is_connection_error(last.error)
            result = SendResult(ok=False, retryable=retryable,
                                message=f"{type(last.error).__name__}: {last.error}")
        else:
            status = last.status_code
            message = f"HTTP {status} {last.reason}: {_error_text(last)}"
            if status in RETRYABLE:
                result = SendResult(ok=False, retryable=True, throttle=_retry_after(last), message=message)
            else:
                result = SendResult(ok=False, retryable=False, message=message)
        result.attempts = attempts
        return result

    def close(self) -> None:
        for exporter in (self._metrics, self._logs):
            if exporter is not None:
                exporter.shutdown()
        self._metrics = self._logs = None


def _header(result: BaseHTTPResult, name: str) -> str:
    try:
        return result.headers().get(name) or ""
    except Exception:
        return ""


def _partial_success(signal: str, result: BaseHTTPResult | None) -> SendResult:
    if result is None or "protobuf" not in _header(result, "content-type"):
        return SendResult(ok=True)
    message = _RESPONSES[signal]()
    try:
        message.ParseFromString(result.content())
    except Exception:  # the data was accepted; an unreadable reply does not undo that
        return SendResult(ok=True)
    partial = message.partial_success
    rejected = partial.rejected_data_points if signal == "metrics" else partial.rejected_log_records
    return SendResult(ok=True, rejected=int(rejected), message=partial.error_message)


def _retry_after(result: BaseHTTPResult) -> float | None:
    # The SDK's own parser (delay-seconds or HTTP-date), so both layers read it alike.
    return _extract_retry_after(result)


def _error_text(result: BaseHTTPResult) -> str:
    # OTLP servers answer errors with a protobuf google.rpc.Status; others with text.
    try:
        data = result.content()
    except Exception:
        return "(no body)"
    if "protobuf" in _header(result, "content-type"):
        status = status_pb2.Status()
        try:
            status.ParseFromString(data)
            return status.message or "(no message)"
        except Exception:
            pass
    text = data[:200].decode("utf-8", "replace").strip()
    return text or "(no body)"
