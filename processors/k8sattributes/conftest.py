"""Fixtures: a running stand-in API server, a kubeconfig for it, and processors built on it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from flowtel.component import CreateSettings, Telemetry
from processors.k8sattributes.config import K8sAttributesConfig
from processors.k8sattributes.processor import K8sAttributesProcessor
from tests.kubeapi import FakeApiServer

# Short everything, so that reconnects and relists happen within a test's patience.
FAST = {
    "backoff": {"initial_interval": "20ms", "max_interval": "200ms"},
    "initial_sync_timeout": "5s",
    "request_timeout": "3s",
}


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval=0.1).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(api: FakeApiServer, tmp_path: Path) -> str:
    return api.write_kubeconfig(str(tmp_path / "kubeconfig"))


@pytest.fixture
def make_processor(kubeconfig: str) -> Iterator[Callable[..., K8sAttributesProcessor]]:
    started: list[K8sAttributesProcessor] = []

    def make(node_name: str = "node-1", telemetry: Telemetry | None = None, start: bool = True, **overrides: Any) -> K8sAttributesProcessor:
        raw: dict[str, Any] = {"auth_type": "kubeConfig", "kubeconfig": kubeconfig, **FAST}
        raw.update(overrides)
        config = K8sAttributesConfig.model_validate(raw)
        settings = CreateSettings(id="k8sattributes", node_name=node_name, telemetry=telemetry or Telemetry())
        processor = K8sAttributesProcessor(settings, config)
        if start:
            processor.start()
            started.append(processor)
        return processor

    yield make
    for p in started:
        p.shutdown()
