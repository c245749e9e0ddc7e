"""A real OTLP receiver for tests: gRPC (opentelemetry-proto's generated services on grpcio)
and HTTP (protobuf bodies on http.server, gzip understood), recording what arrives.

Either server can be stopped and started again on the same port to play a backend
outage, and can be told to answer with an error (permanent, transient, throttling, or a
partial success) to exercise the exporters' retry rules.
"""
from __future__ import annotations

import gzip
import socket
import ssl
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

_REQUESTS = {"metrics": metrics_service_pb2.ExportMetricsServiceRequest, "logs": logs_service_pb2.ExportLogsServiceRequest}
_RESPONSES = {"metrics": metrics_service_pb2.ExportMetricsServiceResponse, "logs": logs_service_pb2.ExportLogsServiceResponse}
_TEMPORALITY = {AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE: "cumulative",
                AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA: "delta"}


@dataclass
class Received:
    signal: str  # "metrics" | "logs"
    request: object  # ExportMetricsServiceRequest | ExportLogsServiceRequest
    headers: dict[str, str]
    content_encoding: str = ""  # HTTP only: the request's Content-Encoding
    received_ns: int = field(default_factory=time.time_ns)  # wall clock, when the server took it


@dataclass
class Fault:
    """What the server answers instead of success, for the next ``times`` requests."""

    times: int
    grpc_code: grpc.StatusCode | None = None
    http_status: int = 0
    retry_after: float | None = None  # gRPC RetryInfo / HTTP Retry-After seconds
    rejected: int = 0  # success with a partial_success rejecting this many items
    message: str = "injected by the test"


@dataclass(frozen=True)
class Point:
    """One data point as received. A histogram's ``value`` is its sum; ``count``,
    ``bounds`` and ``bucket_counts`` are set for histograms only, and ``has_min_max`` says
    whether the optional min/max fields were sent."""

    name: str
    kind: str  # "sum" | "gauge" | "histogram"
    attributes: dict[str, str]
    value: float
    start_ns: int
    time_ns: int
    temporality: str  # "cumulative" | "delta" | "" (gauge)
    monotonic: bool
    unit: str
    description: str
    count: int = 0
    bounds: tuple[float, ...] = ()
    bucket_counts: tuple[int, ...] = ()
    has_min_max: bool = False
    is_int: bool = False  # a NumberDataPoint sent as_int


@dataclass
class Recorder:
    received: list[Received] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    requests_seen: int = 0  # including the ones answered with a fault
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def record(self, item: Received) -> Fault | None:
        with self._cond:
            self.requests_seen += 1
            fault = self.faults[0] if self.faults else None
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.pop(0)
                if fault.rejected == 0:
                    self._cond.notify_all()
                    return fault
            self.received.append(item)
            self._cond.notify_all()
            return fault

    def wait_for(self, predicate: Callable[["Recorder"], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def of(self, signal: str) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.signal == signal]

    def points(self) -> list[Point]:
        out = []
        for r in self.of("metrics"):
            for rm in r.request.resource_metrics:  # type: ignore[attr-defined]
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        data = getattr(m, kind)
                        temporality = ""
                        monotonic = False
                        if kind in ("sum", "histogram", "exponential_histogram"):
                            temporality = _TEMPORALITY.get(data.aggregation_temporality, "unspecified")
                        if kind == "sum":
                            monotonic = data.is_monotonic
                        for dp in data.data_points:
                            attrs = {kv.key: kv.value.string_value for kv in dp.attributes}
                            if kind == "histogram":
                                out.append(Point(m.name, kind, attrs, dp.sum, dp.start_time_unix_nano,
                                                 dp.time_unix_nano, temporality, False, m.unit, m.description,
                                                 count=dp.count, bounds=tuple(dp.explicit_bounds),
                                                 bucket_counts=tuple(dp.bucket_counts),
                                                 has_min_max=dp.HasField("min") or dp.HasField("max")))
                                continue
                            if kind != "sum" and kind != "gauge":
                                raise AssertionError(f"{m.name}: unexpected OTLP metric type {kind}")
                            is_int = dp.WhichOneof("value") == "as_int"
                            value = dp.as_int if is_int else dp.as_double
                            out.append(Point(m.name, kind, attrs, value, dp.start_time_unix_nano,
                                             dp.time_unix_nano, temporality, monotonic, m.unit, m.description,
                                             is_int=is_int))
        return out

    def log_records(self) -> list[tuple[dict[str, object], object]]:
        """(resource attributes, LogRecord) for every log record received, in order."""
        out = []
        for r in self.of("logs"):
            for rl in r.request.resource_logs:  # type: ignore[attr-defined]
                resource = {kv.key: any_to_python(kv.value) for kv in rl.resource.attributes}
                for sl in rl.scope_logs:
                    out.extend((resource, lr) for lr in sl.log_records)
        return out

    def log_count(self) -> int:
        return len(self.log_records())


def any_to_python(value: AnyValue) -> object:
    which = value.WhichOneof("value")
    if which == "kvlist_value":
        return {kv.key: any_to_python(kv.value) for kv in value.kvlist_value.values}
    if which == "array_value":
        return [any_to_python(v) for v in value.array_value.values]
    return None if which is None else getattr(value, which)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _GrpcService(metrics_service_pb2_grpc.MetricsServiceServicer, logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def _handle(self, signal: str, request: object, context: grpc.ServicerContext) -> object:
        if not context.is_active():
            # The client gave up on this call (its deadline passed while the request waited
            # for a worker): it will resend it, so taking it too would receive it twice.
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the client's deadline passed before it was handled")
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        fault = self.recorder.record(Received(signal, request, headers))
        response = _RESPONSES[signal]()
        if fault is None:
            return response
        if fault.rejected:
            partial = response.partial_success
            if signal == "metrics":
                partial.rejected_data_points = fault.rejected
            else:
                partial.rejected_log_records = fault.rejected
            partial.error_message = fault.message
            return response
        assert fault.grpc_code is not None
        if fault.retry_after is not None:
            info = error_details_pb2.RetryInfo(retry_delay=Duration(
                seconds=int(fault.retry_after), nanos=int((fault.retry_after % 1) * 1e9)))
            status = status_pb2.Status(code=fault.grpc_code.value[0], message=fault.message)
            status.details.add().Pack(info)
            context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
        context.abort(fault.grpc_code, fault.message)

    def Export(self, request: object, context: grpc.ServicerContext) -> object:  # noqa: N802 (gRPC name)
        signal = "metrics" if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest) else "logs"
        return self._handle(signal, request, context)


STOP_GRACE_S: float = 2.0  # a handler only records and answers: in-flight calls end within milliseconds


class GrpcOtlpServer:
    """OTLP/gRPC on 127.0.0.1; TLS when ``server_credentials`` are given."""

    def __init__(self, recorder: Recorder | None = None, *,
                 server_credentials: grpc.ServerCredentials | None = None) -> None:
        self.recorder = recorder or Recorder()
        self.port = free_port()
        self._credentials = server_credentials
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "GrpcOtlpServer":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        service = _GrpcService(self.recorder)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(service, server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(service, server)
        address = self.endpoint
        if self._credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, self._credentials)
        if bound != self.port:
            raise RuntimeError(f"could not bind {address}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """The backend goes away: new calls are refused at once, the calls it already took are
        answered first (grace). Stopping with no grace cancelled calls whose request was already
        recorded, so the exporter, told they failed, rightly resent them and the test saw those
        records delivered twice (test_otlp_outage_e2e failed so once)."""
        if self._server is not None:
            self._server.stop(grace=STOP_GRACE_S).wait()
            self._server = None


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_RecordingHTTPServer"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        signal = {"/v1/metrics": "metrics", "/v1/logs": "logs"}.get(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if signal is None:
            self._reply(404, b"no such OTLP path", "text/plain")
            return
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        request = _REQUESTS[signal]()
        request.ParseFromString(body)
        headers = {k.lower(): v for k, v in self.headers.items()}
        fault = self.server.recorder.record(Received(signal, request, headers, encoding))
        response = _RESPONSES[signal]()
        if fault is not None and fault.rejected:
            partial = response.partial_success
            if signal == "metrics":
                partial.rejected_data_points = fault.rejected
            else:
                partial.rejected_log_records = fault.rejected
            partial.error_message = fault.message
        elif fault is not None:
            status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=fault.message)
            extra = {"Retry-After": str(int(fault.retry_after))} if fault.retry_after is not None else {}
            self._reply(fault.http_status, status.SerializeToString(), "application/x-protobuf", extra)
            return
        self._reply(200, response.SerializeToString(), "application/x-protobuf")

    def _reply(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        pass


class _RecordingHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], recorder: Recorder) -> None:
        self.recorder = recorder
        self.connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(address, _HttpHandler)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._conn_lock:
            self.connections.add(request)
        super().process_request(request, client_address)  # type: ignore[arg-type]

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut kept-alive client connections too: an outage must reach clients already connected."""
        with self._conn_lock:
            connections = list(self.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HttpOtlpServer:
    """OTLP/HTTP protobuf on 127.0.0.1; HTTPS when an ``ssl_context`` is given."""

    def __init__(self, recorder: Recorder | None = None, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.recorder = recorder or Recorder()
        self.port = free_port()
        self._ssl = ssl_context
        self._server: _RecordingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "HttpOtlpServer":
        self._server = _RecordingHTTPServer(("127.0.0.1", self.port), self.recorder)
        if self._ssl is not None:
            self._server.socket = self._ssl.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
            self._server = None
