"""config/collector-sidecar.yaml and config/collector-gateway.yaml: drop-in OpenTelemetry
Collector configs. No Collector binary can be installed here, so the configs are checked
against what the pinned otelcol-contrib release contains and against flowtel's needs."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import REPO, render, find, container

CONFIGS = ["config/collector-sidecar.yaml", "config/collector-gateway.yaml"]
VERSION = "0.136.0"

# Component type names of otelcol-contrib 0.136.0, from its build manifest:
# open-telemetry/opentelemetry-collector-releases, distributions/otelcol-contrib/manifest.yaml
# (every entry below is a module listed there at v0.136.0; the type name is the one the
# component registers, e.g. memorylimiterprocessor -> memory_limiter). Not exhaustive: the
# components a flowtel Collector config plausibly uses.
OTELCOL_CONTRIB: dict[str, set[str]] = {
    "receivers": {
        "otlp",  # go.opentelemetry.io/collector/receiver/otlpreceiver
        "nop",  # .../receiver/nopreceiver
        "prometheus",  # contrib receiver/prometheusreceiver
        "filelog",  # receiver/filelogreceiver
        "hostmetrics",  # receiver/hostmetricsreceiver
        "kubeletstats",  # receiver/kubeletstatsreceiver
        "k8s_cluster",  # receiver/k8sclusterreceiver
        "k8s_events",  # receiver/k8seventsreceiver
        "k8sobjects",  # receiver/k8sobjectsreceiver
        "jaeger",  # receiver/jaegerreceiver
        "zipkin",  # receiver/zipkinreceiver
    },
    "processors": {
        "batch",  # go.opentelemetry.io/collector/processor/batchprocessor
        "memory_limiter",  # .../processor/memorylimiterprocessor
        "attributes",  # contrib processor/attributesprocessor
        "resource",  # processor/resourceprocessor
        "resourcedetection",  # processor/resourcedetectionprocessor
        "k8sattributes",  # processor/k8sattributesprocessor
        "filter",  # processor/filterprocessor
        "transform",  # processor/transformprocessor
        "metricstransform",  # processor/metricstransformprocessor
        "cumulativetodelta",  # processor/cumulativetodeltaprocessor
        "deltatocumulative",  # processor/deltatocumulativeprocessor
        "groupbyattrs",  # processor/groupbyattrsprocessor
        "redaction",  # processor/redactionprocessor
    },
    "exporters": {
        "debug",  # go.opentelemetry.io/collector/exporter/debugexporter
        "nop",  # .../exporter/nopexporter
        "otlp",  # .../exporter/otlpexporter
        "otlphttp",  # .../exporter/otlphttpexporter
        "prometheus",  # contrib exporter/prometheusexporter
        "prometheusremotewrite",  # exporter/prometheusremotewriteexporter
        "azuremonitor",  # exporter/azuremonitorexporter
        "azuredataexplorer",  # exporter/azuredataexplorerexporter
        "file",  # exporter/fileexporter
        "kafka",  # exporter/kafkaexporter
        "loadbalancing",  # exporter/loadbalancingexporter
        "elasticsearch",  # exporter/elasticsearchexporter
    },
    "extensions": {
        "health_check",  # contrib extension/healthcheckextension
        "pprof",  # extension/pprofextension
        "zpages",  # go.opentelemetry.io/collector/extension/zpagesextension
        "file_storage",  # extension/storage/filestorage
        "basicauth",  # extension/basicauthextension
        "bearertokenauth",  # extension/bearertokenauthextension
        "oauth2client",  # extension/oauth2clientauthextension
        "headers_setter",  # extension/headerssetterextension
        "azureauth",  # extension/azureauthextension
        "k8s_observer",  # extension/observer/k8sobserver
    },
    "connectors": {
        "forward",  # go.opentelemetry.io/collector/connector/forwardconnector
        "count",  # contrib connector/countconnector
        "routing",  # connector/routingconnector
        "failover",  # connector/failoverconnector
        "sum",  # connector/sumconnector
    },
}
TOP_LEVEL = {"receivers", "processors", "exporters", "extensions", "connectors", "service"}
_ENV = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


def load(path: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / path).read_text())


@pytest.mark.parametrize("path", CONFIGS)
def test_config_uses_only_otelcol_contrib_components(path: str) -> None:
    cfg = load(path)
    assert set(cfg) <= TOP_LEVEL, f"unknown top-level keys: {set(cfg) - TOP_LEVEL}"
    for kind, components in cfg.items():
        if kind == "service":
            continue
        for cid in components:
            ctype = cid.split("/", 1)[0]
            assert ctype in OTELCOL_CONTRIB[kind], f"{path}: {kind}.{cid}: '{ctype}' is not in otelcol-contrib {VERSION}"


@pytest.mark.parametrize("path", CONFIGS)
def test_pipelines_are_wired(path: str) -> None:
    cfg = load(path)
    service = cfg["service"]
    used: set[tuple[str, str]] = {("extensions", e) for e in service.get("extensions", [])}
    for ext in service.get("extensions", []):
        assert ext in cfg["extensions"], f"service.extensions: {ext} is not defined"
    # flowtel sends metrics (hubble_*, networkobservability_*, flowtel_*) and logs (flows).
    assert set(service["pipelines"]) == {"metrics", "logs"}
    for pid, spec in service["pipelines"].items():
        assert spec["receivers"] == ["otlp"], pid
        # memory_limiter first, as the Collector's docs require, then batch.
        assert spec["processors"][0] == "memory_limiter" and "batch" in spec["processors"], pid
        for key in ("receivers", "processors", "exporters"):
            for cid in spec[key]:
                assert cid in cfg[key], f"{pid}.{key}: {cid} is not defined"
                used.add((key, cid))
        assert spec["exporters"], pid
    defined = {(kind, cid) for kind in TOP_LEVEL - {"service"} for cid in cfg.get(kind) or {}}
    assert defined == used, f"defined but unused: {defined - used}"


@pytest.mark.parametrize("path", CONFIGS)
def test_prometheus_names_are_kept_exactly(path: str) -> None:
    """flowtel's names are ACNS's and Hubble's; the Collector must not add `_total` or units."""
    cfg = load(path)
    prom = [cid for cid in cfg["exporters"] if cid.split("/")[0] in ("prometheus", "prometheusremotewrite")]
    assert prom, "no Prometheus exporter"
    for cid in prom:
        exp = cfg["exporters"][cid]
        assert exp["add_metric_suffixes"] is False, cid
        assert exp["resource_to_telemetry_conversion"] == {"enabled": True}, cid
        assert cid in cfg["service"]["pipelines"]["metrics"]["exporters"]
        # Same port as the agent's own exporter, so the metrics Service works either way.
        assert exp["endpoint"] == "0.0.0.0:9965"


@pytest.mark.parametrize("path", CONFIGS)
def test_every_destination_is_configured(path: str) -> None:
    cfg = load(path)
    pipelines = cfg["service"]["pipelines"]
    # Azure Monitor takes the flow logs; its credentials come from the environment only.
    assert cfg["exporters"]["azuremonitor"] == {"connection_string": "${env:APPLICATIONINSIGHTS_CONNECTION_STRING}"}
    assert "azuremonitor" in pipelines["logs"]["exporters"]
    # Another OTLP backend takes both signals.
    backend = [cid for cid in cfg["exporters"] if cid.split("/")[0] == "otlp"]
    assert backend and all(b in pipelines[s]["exporters"] for b in backend for s in ("metrics", "logs"))


@pytest.mark.parametrize("path", CONFIGS)
def test_environment_is_documented_and_never_inline_secrets(path: str) -> None:
    text = (REPO / path).read_text()
    header = text.split("\nreceivers:", 1)[0]
    for var in set(_ENV.findall(text)):
        assert re.search(rf"^#\s+{var}\s", header, re.M), f"{path}: ${{env:{var}}} is not documented in the header"
    assert "InstrumentationKey=" not in text
    assert f"otel/opentelemetry-collector-contrib:{VERSION}" in header


def test_the_overlays_run_the_version_the_list_is_for() -> None:
    sidecar = container(find(render("collector-sidecar"), "DaemonSet", "flowtel"), "otel-collector")
    gateway = container(find(render("collector-gateway"), "Deployment", "flowtel-collector"), "otel-collector")
    assert sidecar["image"] == gateway["image"] == f"otel/opentelemetry-collector-contrib:{VERSION}"


def test_sidecar_listens_on_loopback_only_where_it_can() -> None:
    cfg = load("config/collector-sidecar.yaml")
    for proto, spec in cfg["receivers"]["otlp"]["protocols"].items():
        assert spec["endpoint"].startswith("127.0.0.1:"), proto
    assert cfg["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]["host"] == "127.0.0.1"


def test_readme_documents_every_collector_secret_key() -> None:
    readme = (REPO / "README.md").read_text()
    keys = set()
    for path in CONFIGS:
        keys |= set(_ENV.findall((REPO / path).read_text()))
    for key in keys:
        assert key in readme, f"README does not tell how to set {key}"
    assert Path(REPO / "config" / "kustomization.yaml").is_file()
