"""What the Kustomize packaging renders, for the tests: `kubectl kustomize` output as dicts."""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from flowtel.config import component_type

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZATIONS = {
    "base": DEPLOY / "base",
    "collector-sidecar": DEPLOY / "overlays" / "collector-sidecar",
    "collector-gateway": DEPLOY / "overlays" / "collector-gateway",
    "prometheus-only": DEPLOY / "overlays" / "prometheus-only",
    "hubble-relay": DEPLOY / "overlays" / "hubble-relay",
}
OVERLAYS = [name for name in KUSTOMIZATIONS if name != "base"]
# The Kubernetes releases the manifests are validated against: the oldest supported (the
# securityContext.appArmorProfile field is GA since 1.30) and the newest the validator knows.
K8S_MIN = "1.30.0"


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed on this machine")
    return path


@functools.lru_cache(maxsize=None)
def _render(directory: str) -> str:
    proc = subprocess.run([kubectl(), "kustomize", directory], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return proc.stdout


def render(name: str) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize` prints for one kustomization (fresh copies)."""
    return [d for d in yaml.safe_load_all(_render(str(KUSTOMIZATIONS[name]))) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def find_all(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name} in {workload['metadata']['name']}"
    return found[0]


def config_map_data(docs: list[dict[str, Any]], name_prefix: str) -> dict[str, str]:
    """The data of the (hash-suffixed) ConfigMap generated as ``name_prefix``."""
    found = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].rsplit("-", 1)[0] == name_prefix]
    assert len(found) == 1, f"expected one ConfigMap generated as {name_prefix}, found {len(found)}"
    return found[0]["data"]


def agent_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The agent config the DaemonSet mounts (flowtel-config's config.yaml), parsed."""
    return yaml.safe_load(config_map_data(docs, "flowtel-config")["config.yaml"])


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, value) in a nested structure, e.g. ("spec.template.spec.hostNetwork", True)."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")
