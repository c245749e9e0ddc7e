"""Config: defaults, the testdata configs through the real loader, and every validation message."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flowtel import doctor
from flowtel.preflight import KubernetesAccess
from flowtel.config import ConfigError, load_config, parse_config
from flowtel.registry import factories_by_kind
from processors.k8sattributes.config import K8sAttributesConfig
from processors.k8sattributes.factory import FACTORY
from processors.k8sattributes.metadata import DEFAULT_METADATA

TESTDATA = Path(__file__).parent / "testdata"


def test_defaults_follow_the_collector_and_the_issue() -> None:
    cfg = K8sAttributesConfig()
    assert cfg.source == "kubernetes" and cfg.auth_type == "serviceAccount"
    assert cfg.mode == "cluster"
    assert cfg.deleted_pod_grace == 120.0
    assert cfg.watch_replicasets and cfg.watch_jobs
    assert cfg.extract.metadata == DEFAULT_METADATA and "k8s.cluster.name" not in DEFAULT_METADATA
    assert cfg.owner_cache.size > 0 and cfg.owner_cache.ttl > 0


def test_testdata_config_loads_through_the_registry() -> None:
    config = load_config(TESTDATA / "config.yaml", factories=factories_by_kind(), environ={})
    procs = config.components[FACTORY.kind]
    node = procs["k8sattributes/node"]
    assert isinstance(node, K8sAttributesConfig)
    assert node.mode == "node" and node.deleted_pod_grace == 30.0
    assert not node.watch_replicasets and not node.watch_jobs
    assert node.owner_cache.size == 20000 and node.owner_cache.ttl == 600.0
    assert node.backoff.initial_interval == 0.5 and node.backoff.max_interval == 60.0
    ext = procs["k8sattributes/extract"].extract
    assert [r.key or r.key_regex for r in ext.labels] == ["app", r"app\.kubernetes\.io/(.*)", "team"]
    assert ext.labels[2].from_ == "namespace" and ext.annotations[0].tag_name == "service.owner"
    static = procs["k8sattributes/static"]
    assert static.source == "static" and static.auth_type is None and static.static.path == "/etc/flowtel/endpoints.yaml"


def test_doctor_checks_kubernetes_for_api_configs_only() -> None:
    factories = factories_by_kind()

    def settings(proc: dict[str, Any]) -> tuple[str, str | None] | None:
        cfg = parse_config({
            "receivers": {"ebpf": {}}, "processors": {"k8sattributes": proc}, "exporters": {"console": {}},
            "service": {"pipelines": {"logs": {"receivers": ["ebpf"], "processors": ["k8sattributes"], "exporters": ["console"]}}},
        }, "t.yaml", factories=factories, environ={})
        access = [n for n in doctor.requirements_of(cfg, factories) if isinstance(n.requirement, KubernetesAccess)]
        if not access:
            return None
        assert [n.by for n in access] == [("processors.k8sattributes",)]
        req = access[0].requirement
        assert isinstance(req, KubernetesAccess) and ("", "pods") in req.resources
        return req.auth_type, req.kubeconfig

    assert settings({}) == ("serviceAccount", None)
    assert settings({"auth_type": "kubeConfig", "kubeconfig": "/k"}) == ("kubeConfig", "/k")
    assert settings({"source": "static", "static": {"path": "/f"}}) is None


@pytest.mark.parametrize(
    ("processor", "path", "message"),
    [
        ({"auth_typ": "kubeConfig"}, "processors.k8sattributes.auth_typ", "unknown key"),
        ({"auth_type": "token"}, "processors.k8sattributes.auth_type", "'serviceAccount' or 'kubeConfig'"),
        ({"mode": "zone"}, "processors.k8sattributes.mode", "'cluster' or 'node'"),
        ({"deleted_pod_grace": "2 weeks"}, "processors.k8sattributes.deleted_pod_grace", "expected a duration"),
        ({"owner_cache": {"size": 0}}, "processors.k8sattributes.owner_cache.size", "greater than or equal to 1"),
        ({"backoff": {"initial_interval": "10s", "max_interval": "1s"}}, "processors.k8sattributes.backoff",
         "max_interval must not be shorter than initial_interval"),
        ({"extract": {"labels": [{"key": "a", "key_regex": "b"}]}}, "processors.k8sattributes.extract.labels[0]",
         "set exactly one of key and key_regex"),
        ({"extract": {"labels": [{"tag_name": "x"}]}}, "processors.k8sattributes.extract.labels[0]",
         "set exactly one of key and key_regex"),
        ({"extract": {"labels": [{"key_regex": "app("}]}}, "processors.k8sattributes.extract.labels[0]",
         "not a valid regular expression"),
        ({"extract": {"labels": [{"key_regex": "a(.*)", "tag_name": "x.$2"}]}}, "processors.k8sattributes.extract.labels[0]",
         "tag_name refers to $2, but key_regex has 1 group(s)"),
        ({"extract": {"annotations": [{"key": "a", "tag_name": "x.$1"}]}}, "processors.k8sattributes.extract.annotations[0]",
         "only together with key_regex"),
        ({"extract": {"labels": [{"key": "a", "from": "node"}]}}, "processors.k8sattributes.extract.labels[0].from",
         "'pod' or 'namespace'"),
        ({"extract": {"metadata": ["k8s.pod.name", "k8s.pod.ip"]}}, "processors.k8sattributes.extract.metadata",
         "unknown metadata k8s.pod.ip"),
        ({"source": "static"}, "processors.k8sattributes", "source static needs static.path"),
        ({"source": "static", "static": {"path": "/f"}, "auth_type": "kubeConfig"}, "processors.k8sattributes",
         "auth_type apply to source kubernetes only"),
        ({"static": {"path": "/f"}}, "processors.k8sattributes", "static applies to source static only"),
        ({"kubeconfig": "/k"}, "processors.k8sattributes", "kubeconfig and context apply to auth_type kubeConfig only"),
        ({"page_size": 0}, "processors.k8sattributes.page_size", "greater than or equal to 1"),
    ],
)
def test_errors_name_the_key_and_say_what_is_expected(processor: dict[str, Any], path: str, message: str) -> None:
    raw = {
        "receivers": {"ebpf": {}}, "processors": {"k8sattributes": processor}, "exporters": {"console": {}},
        "service": {"pipelines": {"logs": {"receivers": ["ebpf"], "processors": ["k8sattributes"], "exporters": ["console"]}}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "flowtel.yaml", factories=factories_by_kind(), environ={})
    assert info.value.path == path, info.value
    assert message in info.value.message, info.value


def test_metrics_pipelines_are_refused() -> None:
    raw = {
        "receivers": {"ebpf": {}}, "processors": {"k8sattributes": {}}, "exporters": {"console": {}},
        "service": {"pipelines": {"metrics": {"receivers": ["ebpf"], "processors": ["k8sattributes"], "exporters": ["console"]}}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "flowtel.yaml", factories=factories_by_kind(), environ={})
    assert info.value.path == "service.pipelines.metrics.processors[0]"
    assert "does not support metrics pipelines" in info.value.message
