"""OTLP/HTTP with protobuf bodies, on http.client: one kept-alive connection per URL.

Responses are judged as the Collector's otlphttp exporter judges them: 2xx is success
(a protobuf body may carry a partial success); 429, 502, 503 and 504 are transient and
their ``Retry-After`` is honoured; connection errors and timeouts are transient; every
other status is permanent.
"""
from __future__ import annotations

import gzip
import http.client
import ssl
import time
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from exporters.common.otlp_encoding import FLOWTEL_VERSION
from exporters.common.sending import Request, SendResult
from exporters.otlphttp.config import OtlpHttpConfig
from flowtel.errors import StartError

_RETRYABLE = frozenset({429, 502, 503, 504})
_RESPONSES = {"metrics": ExportMetricsServiceResponse, "logs": ExportLogsServiceResponse}


def ssl_context(config: OtlpHttpConfig, exporter_id: str) -> ssl.SSLContext:
    tls = config.tls
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
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _Target:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.connection: http.client.HTTPConnection | None = None


class HttpTransport:
    def __init__(self, config: OtlpHttpConfig, exporter_id: str) -> None:
        self._config = config
        self._exporter_id = exporter_id
        self._targets = {signal: _Target(url) for signal, url in config.urls().items()}
        self._context: ssl.SSLContext | None = None
        self._gzip = config.compression == "gzip"
        self._headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"flowtel/{FLOWTEL_VERSION}",
            **config.headers,
        }
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"

    def open(self) -> None:
        """Load TLS material now, so a bad path stops start-up rather than every send."""
        if any(t.https for t in self._targets.values()):
            self._context = ssl_context(self._config, self._exporter_id)

    def send(self, request: Request, timeout: float) -> SendResult:
        target = self._targets[request.signal]
        body = gzip.compress(request.payload, compresslevel=6) if self._gzip else request.payload
        try:
            connection = self._connection(target, timeout)
            connection.request("POST", target.path, body=body, headers=self._headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            # Also a stale kept-alive connection the server closed: reconnect on the next attempt.
            self._drop(target)
            return SendResult(ok=False, retryable=True, message=f"{type(exc).__name__}: {exc}")
        status = response.status
        if response.getheader("Connection", "").lower() == "close":
            self._drop(target)
        if 200 <= status < 300:
            return _partial_success(request.signal, response, data)
        message = f"HTTP {status} {response.reason}: {_error_text(response, data)}"
        if status in _RETRYABLE:
            return SendResult(ok=False, retryable=True, throttle=_retry_after(response.getheader("Retry-After")),
                              message=message)
        return SendResult(ok=False, retryable=False, message=message)

    def close(self) -> None:
        for target in self._targets.values():
            self._drop(target)

    def _connection(self, target: _Target, timeout: float) -> http.client.HTTPConnection:
        connection = target.connection
        if connection is None:
            if target.https:
                if self._context is None:
                    self.open()
                connection = http.client.HTTPSConnection(target.host, target.port, timeout=timeout,
                                                         context=self._context)
            else:
                connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
            target.connection = connection
        else:
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
        return connection

    @staticmethod
    def _drop(target: _Target) -> None:
        if target.connection is not None:
            target.connection.close()
            target.connection = None


def _partial_success(signal: str, response: http.client.HTTPResponse, data: bytes) -> SendResult:
    if not data or "protobuf" not in (response.getheader("Content-Type") or ""):
        return SendResult(ok=True)
    message = _RESPONSES[signal]()
    try:
        message.ParseFromString(data)
    except Exception:  # the data was accepted; an unreadable reply does not undo that
        return SendResult(ok=True)
    partial = message.partial_success
    rejected = partial.rejected_data_points if signal == "metrics" else partial.rejected_log_records
    return SendResult(ok=True, rejected=int(rejected), message=partial.error_message)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(response: http.client.HTTPResponse, data: bytes) -> str:
    # OTLP servers answer errors with a protobuf google.rpc.Status; others with text.
    if "protobuf" in (response.getheader("Content-Type") or ""):
        status = status_pb2.Status()
        try:
            status.ParseFromString(data)
            return status.message or "(no message)"
        except Exception:
            pass
    text = data[:200].decode("utf-8", "replace").strip()
    return text or "(no body)"

