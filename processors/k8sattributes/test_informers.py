"""The real ``kubernetes`` client and flowtel's informers against the stand-in API server:
list, watch, bookmarks, 410 relists, restarts, disconnects, selectors, errors, auth."""
from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from flowtel.component import CreateSettings, Kind, Status, Telemetry
from flowtel.errors import StartError
from flowtel.records import Flow, Verdict
from processors.k8sattributes.config import K8sAttributesConfig
from processors.k8sattributes.conftest import FAST, wait_until
from processors.k8sattributes.internal.kube import client as kube_client
from processors.k8sattributes.kube_source import KubeSource
from processors.k8sattributes.processor import K8sAttributesProcessor
from tests.kubeapi import FakeApiServer
from tests.kubeapi import objects as o

Make = Callable[..., K8sAttributesProcessor]


def source_of(p: K8sAttributesProcessor) -> KubeSource:
    assert isinstance(p.source, KubeSource)
    return p.source


def pod_names(p: K8sAttributesProcessor) -> set[str]:
    return {pod.name for pod in source_of(p).informers["pods"].store.values()}


def count(p: K8sAttributesProcessor, name: str) -> int:
    return p.settings.telemetry.get(p.settings.id, name)


def name_of(p: K8sAttributesProcessor, ip: str) -> str:
    f = Flow(time.time_ns(), "node-1", Verdict.FORWARDED, 4, ip, "8.8.8.8", 17, 1, 53)
    (f,) = p.process([f])
    assert isinstance(f, Flow) and f.source is not None
    return f"{f.source.namespace}/{f.source.pod_name}" if f.source.pod_name else f"identity:{f.source.identity}"


def test_list_then_watch_follows_adds_updates_and_deletes(api: FakeApiServer, make_processor: Make) -> None:
    api.create("pods", o.pod("a", ip="10.0.0.1"))
    p = make_processor()
    assert pod_names(p) == {"a"}
    api.create("pods", o.pod("b", ip="10.0.0.2"))
    api.patch("pods", "a", lambda obj: obj["metadata"]["labels"].update(app="x"))
    api.delete("pods", "b")
    api.create("pods", o.pod("c", ip="10.0.0.3"))
    wait_until(lambda: pod_names(p) == {"a", "c"}, what="watch events")
    a = next(x for x in source_of(p).informers["pods"].store.values() if x.name == "a")
    assert a.label("app") == "x"
    assert count(p, "relists") == 0 and count(p, "api_errors") == 0
    assert count(p, "watch_events") >= 4
    # The watch went out with bookmarks and a server-side timeout, from the list's version.
    watch = next(r for r in api.requests if r.watch and r.path == "/api/v1/pods")
    assert watch.query["allowWatchBookmarks"] == "true" and watch.query["timeoutSeconds"] == "300"
    assert watch.query["resourceVersion"].isdigit()


def test_paged_list_uses_continue(api: FakeApiServer, make_processor: Make) -> None:
    for i in range(7):
        api.create("pods", o.pod(f"p{i}", ip=f"10.0.0.{i + 1}"))
    p = make_processor(page_size=3)
    assert len(pod_names(p)) == 7
    lists = [r for r in api.requests if not r.watch and r.path == "/api/v1/pods"]
    assert [r.query.get("limit") for r in lists] == ["3", "3", "3"]
    assert "continue" not in lists[0].query and all("continue" in r.query for r in lists[1:])


def test_bookmarks_keep_the_resource_version_fresh(api: FakeApiServer, make_processor: Make) -> None:
    api.create("pods", o.pod("a", ip="10.0.0.1"))
    p = make_processor()
    pods = source_of(p).informers["pods"]
    listed_rv = int(pods.resource_version or 0)
    for i in range(5):  # changes elsewhere move the server's resourceVersion on
        api.create("services", o.service(f"s{i}", cluster_ip=f"10.96.0.{i + 10}"))
    target = api.resource_version
    wait_until(lambda: int(pods.resource_version or 0) >= target, what="a bookmark")
    assert listed_rv < target and count(p, "watch_bookmarks") > 0
    # Because of the bookmark, losing the history before it costs no relist.
    api.compact()
    api.drop_watches()
    api.create("pods", o.pod("b", ip="10.0.0.2"))
    wait_until(lambda: pod_names(p) == {"a", "b"}, what="the new pod after reconnecting")
    assert count(p, "relists") == 0


def test_410_gone_relists_and_reconciles(api: FakeApiServer, make_processor: Make) -> None:
    api.create("pods", o.pod("a", ip="10.0.0.1"))
    api.create("pods", o.pod("b", ip="10.0.0.2"))
    p = make_processor(watch_timeout="1s")  # watches end every second: a reconnect follows soon
    api.wait_for_watch("pods")
    api.stop()
    api.delete("pods", "a")  # missed: no watch is open
    api.create("pods", o.pod("c", ip="10.0.0.3"))
    api.restart(new_resource_versions=True)  # the server forgot the history: 410 for everyone
    wait_until(lambda: pod_names(p) == {"b", "c"}, timeout=10, what="relist after 410")
    assert count(p, "relists") >= 1
    # The pod deleted while nobody watched is a deleted pod now: in its grace, then gone.
    assert source_of(p).gauges()["deleted_pods_cached"] == 1
    api.create("pods", o.pod("d", ip="10.0.0.4"))
    wait_until(lambda: "d" in pod_names(p), what="watching after the relist")


def test_restart_with_history_resumes_without_relisting(api: FakeApiServer, make_processor: Make) -> None:
    api.create("pods", o.pod("a", ip="10.0.0.1"))
    p = make_processor()
    api.wait_for_watch("pods")
    api.stop()
    api.create("pods", o.pod("down", ip="10.0.0.9"))  # written while the server is down
    time.sleep(0.3)  # some reconnects fail meanwhile: counted, with backoff
    api.start()
    wait_until(lambda: pod_names(p) == {"a", "down"}, timeout=10, what="the update made during the outage")
    assert count(p, "relists") == 0
    assert count(p, "api_errors") >= 1 and count(p, "watch_restarts") >= 1
    assert name_of(p, "10.0.0.9") == "default/down"


def test_abrupt_disconnect_mid_stream_loses_nothing(api: FakeApiServer, make_processor: Make) -> None:
    p = make_processor()
    for i in range(30):
        api.create("pods", o.pod(f"p{i}", ip=f"10.0.1.{i + 1}"))
        if i % 10 == 5:
            api.drop_watches()
    wait_until(lambda: len(pod_names(p)) == 30, timeout=10, what="all 30 pods")
    assert count(p, "relists") == 0 and count(p, "watch_restarts") >= 1


def test_watch_timeout_rewatches_from_the_last_version(api: FakeApiServer, make_processor: Make) -> None:
    p = make_processor(watch_timeout="1s")
    wait_until(lambda: count(p, "watch_restarts") >= 1, timeout=5, what="a watch ended by the server")
    api.create("pods", o.pod("late", ip="10.0.0.7"))
    wait_until(lambda: pod_names(p) == {"late"}, what="the pod after the re-watch")
    assert count(p, "api_errors") == 0 and count(p, "relists") == 0


def test_node_mode_watches_only_local_pods(api: FakeApiServer, make_processor: Make) -> None:
    api.create("pods", o.pod("local", ip="10.0.1.5", node="node-1"))
    api.create("pods", o.pod("remote", ip="10.0.2.5", node="node-2"))
    api.create("nodes", o.node("node-2", internal_ip="192.168.0.2", pod_cidr="10.0.2.0/24"))
    p = make_processor(mode="node")
    assert pod_names(p) == {"local"}
    pod_requests = [r for r in api.requests if r.path == "/api/v1/pods"]
    assert pod_requests and all(r.query.get("fieldSelector") == "spec.nodeName=node-1" for r in pod_requests)
    # A pod bound to this node later arrives as ADDED (the selector starts matching it).
    pending = o.pod("pending", ip="10.0.1.6", node="")
    api.create("pods", pending)
    api.patch("pods", "pending", lambda obj: obj["spec"].update(nodeName="node-1"))
    wait_until(lambda: pod_names(p) == {"local", "pending"}, what="the newly bound pod")
    assert name_of(p, "10.0.1.5") == "default/local"
    assert name_of(p, "10.0.2.5") == "identity:0"  # another node's pod: unknown, not world


def test_api_errors_are_counted_and_explained(api: FakeApiServer, make_processor: Make, caplog: pytest.LogCaptureFixture) -> None:
    api.create("pods", o.pod("a", ip="10.0.0.1"))
    api.fail_next("pods", 403, times=2, watch=False)
    with caplog.at_level(logging.INFO, logger="flowtel.processor.k8sattributes"):
        p = make_processor()
        wait_until(lambda: pod_names(p) == {"a"}, what="the list after the errors")
    assert count(p, "api_errors") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors  # one clear line, not one per retry
    assert "403 Forbidden" in errors[0] and "get/list/watch on pods" in errors[0]
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_unreachable_at_start_then_catches_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = FakeApiServer(bookmark_interval=0.1)
    server.start()
    server.stop()  # the port is known, nobody listens: connection refused
    server.create("pods", o.pod("web", "shop", ip="10.0.0.5"))
    kubeconfig = server.write_kubeconfig(str(tmp_path / "kubeconfig"))
    cfg = K8sAttributesConfig.model_validate({"auth_type": "kubeConfig", "kubeconfig": kubeconfig, **FAST,
                                              "initial_sync_timeout": "200ms"})
    p = K8sAttributesProcessor(CreateSettings("k8sattributes", "node-1", Telemetry()), cfg)
    with caplog.at_level(logging.INFO, logger="flowtel.processor.k8sattributes"):
        started = time.monotonic()
        p.start()  # does not raise, does not hang
        try:
            assert time.monotonic() - started < 2
            assert name_of(p, "10.0.0.5") == "identity:2"  # passes through as reserved:world
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "connection refused" in errors[0] and "Records keep flowing" in errors[0]
            status = p.settings.telemetry.statuses()[(Kind.PROCESSOR, "k8sattributes")]
            assert status.status is Status.RECOVERABLE_ERROR and "connection refused" in (status.error or "")
            server.start()
            wait_until(lambda: name_of(p, "10.0.0.5") == "shop/web", timeout=10, what="catching up")
            wait_until(lambda: any("answers again" in r.getMessage() for r in caplog.records), what="the recovery line")
            assert p.settings.telemetry.statuses()[(Kind.PROCESSOR, "k8sattributes")].status is Status.OK
        finally:
            p.shutdown()
            server.stop()


def test_kubeconfig_with_a_token(tmp_path: Path) -> None:
    with FakeApiServer(token="s3cret", bookmark_interval=0.1) as server:
        server.create("pods", o.pod("a", ip="10.0.0.1"))
        good = server.write_kubeconfig(str(tmp_path / "good"), token="s3cret")
        bad = server.write_kubeconfig(str(tmp_path / "bad"), token="wrong")
        for path, expect in ((good, "default/a"), (bad, "identity:2")):
            cfg = K8sAttributesConfig.model_validate({"auth_type": "kubeConfig", "kubeconfig": path, **FAST,
                                                      "initial_sync_timeout": "1s"})
            p = K8sAttributesProcessor(CreateSettings("k8sattributes", "node-1", Telemetry()), cfg)
            p.start()
            try:
                assert name_of(p, "10.0.0.1") == expect
                health = source_of(p).health
                assert health is not None
                if path == bad:
                    assert health.last_error.startswith("401 Unauthorized") and count(p, "api_errors") > 0
                else:
                    assert health.healthy and count(p, "api_errors") == 0
            finally:
                p.shutdown()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kubernetes",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


def test_service_account_in_cluster_config(tmp_path: Path, tls_files: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """auth_type serviceAccount: the pod's token and CA files, KUBERNETES_SERVICE_HOST/PORT,
    HTTPS verified against that CA and the token as bearer (the in-cluster loader only does https)."""
    cert, key = tls_files
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text("pod-token")
    (sa_dir / "ca.crt").write_text(Path(cert).read_text())
    with FakeApiServer(token="pod-token", tls=(cert, key), bookmark_interval=0.1) as server:
        server.create("pods", o.pod("a", ip="10.0.0.1"))
        monkeypatch.setattr(kube_client, "SERVICE_ACCOUNT_DIR", str(sa_dir))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        cfg = K8sAttributesConfig.model_validate({**FAST})
        assert cfg.auth_type == "serviceAccount"
        p = K8sAttributesProcessor(CreateSettings("k8sattributes", "node-1", Telemetry()), cfg)
        p.start()
        try:
            assert name_of(p, "10.0.0.1") == "default/a"
            assert count(p, "api_errors") == 0
        finally:
            p.shutdown()


def test_credentials_that_cannot_work_stop_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    p = K8sAttributesProcessor(CreateSettings("k8sattributes", "node-1", Telemetry()), K8sAttributesConfig())
    with pytest.raises(StartError) as info:
        p.start()
    assert "auth_type serviceAccount" in info.value.problem and "kubeConfig" in info.value.remedy
    cfg = K8sAttributesConfig.model_validate({"auth_type": "kubeConfig", "kubeconfig": str(tmp_path / "missing")})
    with pytest.raises(StartError) as info:
        K8sAttributesProcessor(CreateSettings("k8sattributes", "node-1", Telemetry()), cfg).start()
    assert "does not exist" in info.value.problem
    cfg = K8sAttributesConfig.model_validate({"auth_type": "kubeConfig", "kubeconfig": "/dev/null", "mode": "node"})
    with pytest.raises(StartError) as info:
        K8sAttributesProcessor(CreateSettings("k8sattributes", "", Telemetry()), cfg).start()
    assert "NODE_NAME" in info.value.remedy


def test_shutdown_stops_every_thread_promptly(tmp_path: Path) -> None:
    import threading

    # No bookmarks, long watches: the informers sit in a blocking read that shutdown must cut.
    with FakeApiServer(bookmark_interval=3600) as quiet:
        kubeconfig = quiet.write_kubeconfig(str(tmp_path / "kubeconfig"))
        cfg = K8sAttributesConfig.model_validate({"auth_type": "kubeConfig", "kubeconfig": kubeconfig, **FAST})
        p = K8sAttributesProcessor(CreateSettings("k8sattributes", "node-1", Telemetry()), cfg)
        p.start()
        quiet.wait_for_watch("pods")
        time.sleep(0.2)
        started = time.monotonic()
        p.shutdown()
        assert time.monotonic() - started < 1
    assert not [t for t in threading.enumerate() if t.name.startswith("flowtel-k8s") and t.is_alive()]
