"""The health_check extension: config, the answers, and real HTTP against a running Service."""
from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest
from pydantic import ValidationError

from extensions.health_check import health
from extensions.health_check.config import HealthCheckConfig
from extensions.health_check.extension import HealthCheckExtension
from extensions.health_check.factory import FACTORY as HEALTH_CHECK
from flowtel.component import (
    ComponentConfig,
    Consumer,
    CreateSettings,
    Exporter,
    Kind,
    Factory,
    Receiver,
    Status,
    StatusEvent,
    Telemetry,
)
from flowtel.config import parse_config
from flowtel.errors import StartError
from flowtel.pipeline import Service


# --- config -----------------------------------------------------------------------------


def test_config_defaults_are_the_collectors_loopback() -> None:
    cfg = HealthCheckConfig()
    assert (cfg.endpoint, cfg.path, cfg.liveness_path) == ("127.0.0.1:13133", "/", "/livez")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"endpoint": "13133"}, "expected HOST:PORT"),
        ({"endpoint": "0.0.0.0:99999"}, "expected HOST:PORT"),
        ({"endpoint": "::1:13133"}, "in brackets"),
        ({"path": "health"}, "absolute URL path"),
        ({"liveness_path": "/live?x=1"}, "absolute URL path"),
        ({"path": "/same", "liveness_path": "/same"}, "must differ"),
        ({"check_collector_pipeline": {}}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects(raw: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HealthCheckConfig.model_validate(raw)


def test_config_accepts_ipv6_and_port_zero() -> None:
    assert HealthCheckConfig.model_validate({"endpoint": "[::1]:0"}).endpoint == "[::1]:0"


def test_factory() -> None:
    assert (HEALTH_CHECK.type, HEALTH_CHECK.kind, HEALTH_CHECK.config_class) == (
        "health_check", Kind.EXTENSION, HealthCheckConfig)


# --- the answers (pure) -----------------------------------------------------------------


def ev(status: Status, error: str | None = None) -> StatusEvent:
    return StatusEvent(status, error, 1_700_000_000_000_000_000)


def test_go_duration_prints_like_go() -> None:
    assert health.go_duration(0) == "0s"
    assert health.go_duration(1.5) == "1.5s"
    assert health.go_duration(62) == "1m2s"
    assert health.go_duration(3723.25) == "1h2m3.25s"


def test_readiness_needs_ready_service_and_ok_receivers() -> None:
    ok = {(Kind.RECEIVER, "ebpf"): ev(Status.OK), (Kind.EXPORTER, "otlp"): ev(Status.RECOVERABLE_ERROR, "down")}
    before = health.readiness(ok, None)
    assert before.code == 503
    assert before.body["status"] == "Server not available"
    assert (before.body["upSince"], before.body["uptime"]) == ("0001-01-01T00:00:00Z", "")

    up = health.readiness(ok, 1_700_000_000_000_000_000, now_ns=1_700_000_090_000_000_000)
    # An exporter's trouble is shown but does not make the agent unready: its data is queued.
    assert up.code == 200
    assert up.body["status"] == "Server available"
    assert (up.body["upSince"], up.body["uptime"]) == ("2023-11-14T22:13:20.000000000Z", "1m30s")
    assert up.body["components"]["exporters"]["otlp"] == {
        "status": "StatusRecoverableError", "since": "2023-11-14T22:13:20.000000000Z", "error": "down"}

    sick = dict(ok)
    sick[(Kind.RECEIVER, "procfs")] = ev(Status.RECOVERABLE_ERROR, "cannot read /proc/net/snmp")
    assert health.readiness(sick, 1).code == 503
    starting = {(Kind.RECEIVER, "ebpf"): ev(Status.STARTING)}
    assert health.readiness(starting, 1).code == 503


def test_liveness_fails_only_on_permanent_or_fatal_errors() -> None:
    assert health.liveness({(Kind.RECEIVER, "ebpf"): ev(Status.RECOVERABLE_ERROR)}).code == 200
    assert health.liveness({(Kind.RECEIVER, "ebpf"): ev(Status.STARTING)}).body["status"] == "Server alive"
    dead = health.liveness({(Kind.RECEIVER, "ebpf"): ev(Status.PERMANENT_ERROR, "map gone"),
                            (Kind.EXPORTER, "file"): ev(Status.FATAL_ERROR)})
    assert dead.code == 503
    assert dead.body["status"] == "Server not alive"
    assert dead.body["failed"] == ["exporters/file", "receivers/ebpf"]


def test_permanent_error_sticks_until_stopped() -> None:
    t = Telemetry()
    t.report_status(Kind.RECEIVER, "ebpf", Status.PERMANENT_ERROR, "gone")
    t.report_status(Kind.RECEIVER, "ebpf", Status.OK)
    assert t.statuses()[(Kind.RECEIVER, "ebpf")].status is Status.PERMANENT_ERROR
    t.report_status(Kind.RECEIVER, "ebpf", Status.STOPPED)
    assert t.statuses()[(Kind.RECEIVER, "ebpf")].status is Status.STOPPED


# --- real HTTP against a running Service ---------------------------------------------------


class Cfg(ComponentConfig):
    fail_start: bool = False


class Src(Receiver):
    """A receiver whose start can be held, and whose health the test sets."""

    def __init__(self, settings: CreateSettings, cfg: Cfg, nxt: Consumer) -> None:
        super().__init__(settings, nxt)
        self.cfg = cfg
        self.release = threading.Event()
        self.release.set()
        self.starting = threading.Event()

    def start(self) -> None:
        self.starting.set()
        self.release.wait(10)
        if self.cfg.fail_start:
            raise StartError(self.settings.id, "no eBPF here", "run flowtel doctor")


class Sink(Exporter):
    def consume(self, batch: list) -> None:
        pass


FACTORIES = {
    Kind.RECEIVER: {"src": Factory("src", Kind.RECEIVER, Cfg, Src)},
    Kind.PROCESSOR: {},
    Kind.CONNECTOR: {},
    Kind.EXPORTER: {"sink": Factory("sink", Kind.EXPORTER, ComponentConfig, lambda s, c: Sink(s))},
    Kind.EXTENSION: {"health_check": HEALTH_CHECK},
}


def service(src: dict | None = None, health_cfg: dict | None = None) -> Service:
    cfg = {
        "receivers": {"src": src or {}},
        "exporters": {"sink": {}},
        "extensions": {"health_check": {"endpoint": "127.0.0.1:0", **(health_cfg or {})}},
        "service": {"extensions": ["health_check"],
                    "pipelines": {"logs": {"receivers": ["src"], "exporters": ["sink"]}}},
    }
    return Service(parse_config(cfg, "test.yaml", factories=FACTORIES, environ={}), node_name="n",
                   factories=FACTORIES)


def get(endpoint: str, path: str, method: str = "GET") -> tuple[int, dict | None]:
    host, port = endpoint.rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        raw = resp.read()
        assert resp.getheader("Content-Type") == "application/json"
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def endpoint_of(svc: Service) -> str:
    ext = svc.extensions["health_check"]
    assert isinstance(ext, HealthCheckExtension)
    return ext.endpoint


def test_not_ready_while_starting_then_available() -> None:
    svc = service()
    src = svc.receivers["src"]
    assert isinstance(src, Src)
    src.release.clear()
    starter = threading.Thread(target=svc.start)
    starter.start()
    try:
        assert src.starting.wait(5)
        # The extension serves from the start; the receiver is still starting.
        ep = endpoint_of(svc)
        code, body = get(ep, "/")
        assert code == 503 and body is not None
        assert body["status"] == "Server not available"
        assert body["components"]["receivers"]["src"]["status"] == "StatusStarting"
        assert get(ep, "/livez")[0] == 200
    finally:
        src.release.set()
        starter.join(10)
    try:
        code, body = get(ep, "/")
        assert code == 200 and body is not None
        assert body["status"] == "Server available"
        assert body["upSince"] != "0001-01-01T00:00:00Z"
        assert {k: v["status"] for k, v in body["components"]["receivers"].items()} == {"src": "StatusOK"}
        assert body["components"]["exporters"]["sink"]["status"] == "StatusOK"
        assert body["components"]["extensions"]["health_check"]["status"] == "StatusOK"
        assert get(ep, "/", method="HEAD") == (200, None)
    finally:
        svc.shutdown()


def test_unhealthy_receiver_makes_it_unready_until_it_recovers() -> None:
    svc = service()
    svc.start()
    ep = endpoint_of(svc)
    src = svc.receivers["src"]
    try:
        assert get(ep, "/")[0] == 200
        src.report_status(Status.RECOVERABLE_ERROR, "drain failed: map lookup returned EFAULT")
        code, body = get(ep, "/")
        assert code == 503 and body is not None
        assert body["components"]["receivers"]["src"] == {
            "status": "StatusRecoverableError",
            "since": body["components"]["receivers"]["src"]["since"],
            "error": "drain failed: map lookup returned EFAULT",
        }
        assert get(ep, "/livez")[0] == 200, "a recoverable error is no reason to restart"
        src.report_status(Status.OK)
        assert get(ep, "/")[0] == 200
        src.report_status(Status.PERMANENT_ERROR, "program detached by someone else")
        src.report_status(Status.OK)  # too late: a permanent error needs a restart
        assert get(ep, "/")[0] == 503
        code, body = get(ep, "/livez")
        assert code == 503 and body is not None and body["failed"] == ["receivers/src"]
    finally:
        svc.shutdown()


def test_unready_during_shutdown_and_gone_after() -> None:
    svc = service(health_cfg={"path": "/ready", "liveness_path": "/alive"})
    svc.start()
    ep = endpoint_of(svc)
    ext = svc.extensions["health_check"]
    assert get(ep, "/ready")[0] == 200
    assert get(ep, "/alive")[0] == 200
    code, body = get(ep, "/")
    assert code == 404 and body == {"status": "Not found", "paths": ["/ready", "/alive"]}
    ext.not_ready()  # what the Service does first on shutdown
    assert get(ep, "/ready")[0] == 503
    svc.shutdown()
    with pytest.raises(ConnectionRefusedError):
        get(ep, "/ready")
    assert svc.telemetry.statuses()[(Kind.RECEIVER, "src")].status is Status.STOPPED


def test_start_failure_is_a_permanent_error_and_the_server_stops() -> None:
    svc = service(src={"fail_start": True})
    with pytest.raises(StartError, match="no eBPF here"):
        svc.start()
    event = svc.telemetry.statuses()[(Kind.RECEIVER, "src")]
    assert event.status is Status.PERMANENT_ERROR
    assert "start failed: src: no eBPF here" in (event.error or "")
    with pytest.raises(ConnectionRefusedError):
        get(endpoint_of(svc), "/")


def test_port_in_use_is_a_start_error_with_a_remedy() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        ext = HealthCheckExtension(CreateSettings("health_check", "n", Telemetry()),
                                   HealthCheckConfig(endpoint=f"127.0.0.1:{port}"))
        with pytest.raises(StartError, match=f"cannot listen on 127.0.0.1:{port}") as info:
            ext.start()
        assert "extensions.health_check.endpoint" in info.value.remedy
    finally:
        holder.close()


def test_serves_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    ext = HealthCheckExtension(CreateSettings("health_check", "n", Telemetry()), HealthCheckConfig(endpoint="[::1]:0"))
    ext.start()
    try:
        ext.ready()
        assert ext.endpoint.startswith("[::1]:")
        assert get(ext.endpoint, "/")[0] == 200  # no receivers at all: nothing is unhealthy
    finally:
        ext.shutdown()
