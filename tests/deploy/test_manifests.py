"""The Kustomize packaging: every manifest and every rendered overlay against the Kubernetes
schema, the security properties the DaemonSet promises, RBAC, and the agent config it mounts."""
from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from flowtel.component import Kind
from flowtel.config import component_type, parse_config
from flowtel.registry import factories_by_kind
from tests.deploy.manifests import (
    DEPLOY,
    K8S_MIN,
    KUSTOMIZATIONS,
    OVERLAYS,
    REPO,
    agent_config,
    config_map_data,
    container,
    find,
    find_all,
    pod_spec,
    render,
    walk,
)

K8S_VERSIONS = [K8S_MIN, kubernetes_validate.latest_version()]
# The capabilities the agent needs, and why (deploy/base/daemonset.yaml says the same).
AGENT_CAPABILITIES = {"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"}
READ_VERBS = {"get", "list", "watch"}
# What the ClusterRole may read: (API group, resource).
RBAC_RESOURCES = {
    ("", "pods"), ("", "services"), ("", "nodes"), ("", "namespaces"), ("", "endpoints"),
    ("discovery.k8s.io", "endpointslices"), ("apps", "replicasets"), ("batch", "jobs"),
}
COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib:0.136.0"
_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def validate(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')} at {where}: {exc.message}") from None


# --- schema -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rendered_kustomization_is_valid_kubernetes(name: str, version: str) -> None:
    docs = render(name)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "ConfigMap"} <= kinds
    for doc in docs:
        validate(doc, version)
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"].get("namespace") == "flowtel", f"{doc['kind']} {doc['metadata']['name']}"


def source_manifests() -> list[str]:
    """Every file under deploy/ that is a whole Kubernetes object (patches are partial and are
    checked through the rendered overlays; flowtel.yaml files are agent configs)."""
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if docs and all("apiVersion" in d and "kind" in d for d in docs):
            if docs[0]["kind"] == "Kustomization":
                continue
            if any(DEPLOY / "overlays" in path.parents and d["kind"] in ("DaemonSet",) for d in docs):
                continue  # strategic-merge patches of the base DaemonSet
            out.append(str(path.relative_to(REPO)))
    return out


@pytest.mark.parametrize("path", source_manifests())
def test_every_manifest_file_is_valid_kubernetes(path: str) -> None:
    for doc in yaml.safe_load_all((REPO / path).read_text()):
        if doc:
            for version in K8S_VERSIONS:
                validate(doc, version)


def test_the_manifests_found_are_the_expected_ones() -> None:
    assert set(source_manifests()) == {
        "deploy/base/daemonset.yaml", "deploy/base/namespace.yaml", "deploy/base/rbac.yaml",
        "deploy/base/service.yaml", "deploy/base/serviceaccount.yaml",
        "deploy/base/dnsproxy/daemonset.yaml", "deploy/base/dnsproxy/rbac.yaml",
        "deploy/base/dnsproxy/serviceaccount.yaml",
        "deploy/overlays/collector-gateway/gateway.yaml",
        "deploy/cleanup/dnsproxy-cleanup.yaml",
    }


def test_validation_catches_mistakes() -> None:
    """The validator is strict: an unknown field or a wrong type fails (so a pass means something)."""
    ds = find(render("base"), "DaemonSet", "flowtel")
    typo = copy.deepcopy(ds)
    container(typo, "flowtel")["securityContext"]["capabilites"] = {"add": ["BPF"]}
    wrong = copy.deepcopy(ds)
    pod_spec(wrong)["hostNetwork"] = "yes"
    for bad in (typo, wrong):
        with pytest.raises(AssertionError):
            validate(bad, K8S_MIN)


# --- the agent's privileges ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_nothing_is_privileged(name: str) -> None:
    for doc in render(name):
        for path, value in walk(doc):
            if path.endswith("privileged"):
                assert value is False, f"{doc['kind']} {path}"
            if path.endswith("capabilities.add"):
                assert "SYS_ADMIN" not in value and "CAP_SYS_ADMIN" not in value, f"{doc['kind']} {path}"
            if path.endswith(("hostPID", "hostIPC")):
                assert value is False, f"{doc['kind']} {path}"


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_agent_has_exactly_the_documented_capabilities(name: str) -> None:
    ds = find(render(name), "DaemonSet", "flowtel")
    spec = pod_spec(ds)
    agent = container(ds, "flowtel")
    sc = agent["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPABILITIES
    assert len(sc["capabilities"]["add"]) == len(AGENT_CAPABILITIES)
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["privileged"] is False
    assert spec["hostNetwork"] is True
    assert spec.get("hostPID", False) is False
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    # Every other container (the Collector) runs without any privilege.
    for other in spec["containers"]:
        if other["name"] == "flowtel":
            continue
        osc = other["securityContext"]
        assert osc["runAsNonRoot"] is True and osc["capabilities"] == {"drop": ["ALL"]}
        assert osc["allowPrivilegeEscalation"] is False and osc["readOnlyRootFilesystem"] is True


def test_agent_mounts_what_ebpf_needs_read_only_where_it_can() -> None:
    ds = find(render("base"), "DaemonSet", "flowtel")
    volumes = {v["name"]: v for v in pod_spec(ds)["volumes"]}
    mounts = {m["mountPath"]: m for m in container(ds, "flowtel")["volumeMounts"]}
    host = {path: volumes[m["name"]].get("hostPath", {}).get("path") for path, m in mounts.items()}
    assert host["/sys/fs/bpf"] == "/sys/fs/bpf"
    assert host["/sys/kernel/tracing"] == "/sys/kernel/tracing"
    assert host["/host/lib/modules"] == "/lib/modules"
    assert host["/usr/src"] == "/usr/src"
    # bpffs too: the agent only opens the DNS proxy's pins (read-only fds), never pins.
    for path in ("/sys/fs/bpf", "/sys/kernel/tracing", "/host/lib/modules", "/usr/src", "/etc/flowtel"):
        assert mounts[path].get("readOnly") is True, path
    # The entrypoint links headers into /lib/modules: a writable emptyDir, not the host's.
    assert "emptyDir" in volumes[mounts["/lib/modules"]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert not any(v.get("hostPath", {}).get("path") == "/proc" for v in volumes.values())


def test_agent_env_probes_and_resources() -> None:
    docs = render("base")
    ds = find(docs, "DaemonSet", "flowtel")
    agent = container(ds, "flowtel")
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    # The probes use the health_check extension as the mounted config configures it.
    health = agent_config(docs)["extensions"]["health_check"]
    assert ports["health"] == int(health["endpoint"].rsplit(":", 1)[1])
    # Health on loopback only; the kubelet (node network namespace, hostNetwork pod) probes 127.0.0.1.
    assert health["endpoint"].rsplit(":", 1)[0] == "127.0.0.1"
    for probe in ("startupProbe", "readinessProbe"):
        assert agent[probe]["httpGet"] == {"host": "127.0.0.1", "path": health.get("path", "/"), "port": "health"}
    assert agent["livenessProbe"]["httpGet"] == {
        "host": "127.0.0.1", "path": health.get("liveness_path", "/livez"), "port": "health"}
    res = agent["resources"]
    assert set(res) == {"requests", "limits"} and {"cpu", "memory"} <= set(res["requests"]) & set(res["limits"])
    # ~200 MB resident measured with bcc's LLVM loaded: the request must cover it.
    assert res["requests"]["memory"] == "256Mi" and res["limits"]["memory"] == "512Mi"
    assert pod_spec(ds)["serviceAccountName"] == find(docs, "ServiceAccount", "flowtel")["metadata"]["name"]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_variant_serves_health_on_loopback_and_mounts_bpffs_read_only(name: str) -> None:
    docs = render(name)
    spec = pod_spec(find(docs, "DaemonSet", "flowtel"))
    agent = container(find(docs, "DaemonSet", "flowtel"), "flowtel")
    cfg = agent_config(docs)
    assert cfg["extensions"]["health_check"]["endpoint"] == "127.0.0.1:13133"
    # Nothing the agent serves that a browser can reach listens beyond loopback.
    for ext in ("flows", "ui"):
        if ext in cfg.get("extensions", {}):
            assert cfg["extensions"][ext]["endpoint"].startswith("127.0.0.1:"), (name, ext)
    for c in spec["containers"]:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                assert c[probe]["httpGet"].get("host") == "127.0.0.1", (name, c["name"], probe)
    bpffs = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/sys/fs/bpf")
    assert bpffs.get("readOnly") is True


def test_container_args_use_the_mounted_config() -> None:
    ds = find(render("base"), "DaemonSet", "flowtel")
    agent = container(ds, "flowtel")
    mount = next(m for m in agent["volumeMounts"] if m["name"] == "config")
    assert agent["args"] == ["flowtel", "run", "--config", f"{mount['mountPath']}/config.yaml"]


# --- RBAC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rbac_is_read_only_and_limited(name: str) -> None:
    docs = render(name)
    assert not find_all(docs, "Role") and not find_all(docs, "RoleBinding")
    role = find(docs, "ClusterRole", "flowtel")
    granted = set()
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= READ_VERBS, rule
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "/" not in resource, f"subresource {resource}"
                granted.add((group, resource))
    assert granted == RBAC_RESOURCES
    binding = find(docs, "ClusterRoleBinding", "flowtel")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "flowtel"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "flowtel", "namespace": "flowtel"}]


# --- metrics Service and who serves :9965 ----------------------------------------------------


def _listeners(docs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Container name -> ports it declares, for the agent pod."""
    ds = find(docs, "DaemonSet", "flowtel")
    return {c["name"]: [p["containerPort"] for p in c.get("ports", [])] for c in pod_spec(ds)["containers"]}


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_metrics_are_served_where_the_service_and_annotations_point(name: str) -> None:
    docs = render(name)
    cfg = agent_config(docs)
    agent_serves = "prometheus" in (cfg.get("exporters") or {})
    if agent_serves:
        assert cfg["exporters"]["prometheus"]["endpoint"].endswith(":9965")
    listeners = _listeners(docs)
    serving = [c for c, ports in listeners.items() if 9965 in ports]
    services = [s for s in find_all(docs, "Service") if s["metadata"]["name"] == "flowtel-metrics"]
    ds = find(docs, "DaemonSet", "flowtel")
    annotations = ds["spec"]["template"]["metadata"].get("annotations", {})
    if name == "collector-gateway":
        # The gateway serves the metrics; the agents serve none and are not scraped.
        assert not agent_serves and not serving and not services
        assert annotations.get("prometheus.io/scrape") == "false"
        gateway = find(docs, "Deployment", "flowtel-collector")
        assert any(p["containerPort"] == 9965 for p in container(gateway, "otel-collector")["ports"])
        svc = find(docs, "Service", "flowtel-collector")
        assert svc["metadata"]["annotations"]["prometheus.io/port"] == "9965"
        return
    assert serving == (["flowtel"] if agent_serves else ["otel-collector"])
    (svc,) = services
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9965, "targetPort": "metrics", "protocol": "TCP"}]
    assert svc["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9965", "prometheus.io/path": "/metrics"}
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9965"
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_no_two_listeners_share_a_port_in_the_host_network_pod(name: str) -> None:
    """The agent pod uses the node's network namespace: the agent's and the Collector's
    listeners (declared ports and config endpoints) must not collide."""
    docs = render(name)
    seen: dict[int, str] = {}

    def claim(port: int, who: str) -> None:
        assert port not in seen, f"port {port}: {seen.get(port)} and {who}"
        seen[port] = who

    cfg = agent_config(docs)
    # The agent's listeners: its extensions' and its prometheus exporter's endpoints (the
    # otlp exporters' endpoints are where it connects to, not where it listens).
    listening = [("extensions", cid, c) for cid, c in (cfg.get("extensions") or {}).items()]
    listening += [("exporters", cid, c) for cid, c in (cfg.get("exporters") or {}).items()
                  if component_type(cid) == "prometheus"]
    for kind, cid, c in listening:
        if isinstance(c, dict) and "endpoint" in c:
            claim(int(c["endpoint"].rsplit(":", 1)[1]), f"flowtel {kind}.{cid}")
    ds = find(docs, "DaemonSet", "flowtel")
    if any(c["name"] == "otel-collector" for c in pod_spec(ds)["containers"]):
        collector = yaml.safe_load(config_map_data(docs, "flowtel-collector-config")["collector-sidecar.yaml"])
        for path, value in walk(collector):
            if path.endswith("endpoint") and isinstance(value, str) and re.search(r":\d+$", value):
                claim(int(value.rsplit(":", 1)[1]), f"collector {path}")
        for reader in collector["service"]["telemetry"]["metrics"]["readers"]:
            claim(reader["pull"]["exporter"]["prometheus"]["port"], "collector telemetry")


# --- the Collector variants --------------------------------------------------------------


def test_sidecar_overlay_wires_agent_to_collector_over_loopback() -> None:
    docs = render("collector-sidecar")
    ds = find(docs, "DaemonSet", "flowtel")
    agent, otel = container(ds, "flowtel"), container(ds, "otel-collector")
    env = {e["name"]: e.get("value") for e in agent["env"]}
    collector = yaml.safe_load(config_map_data(docs, "flowtel-collector-config")["collector-sidecar.yaml"])
    assert env["OTLP_ENDPOINT"] == collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "127.0.0.1:4317"
    assert agent_config(docs)["exporters"]["otlp"]["endpoint"] == "${env:OTLP_ENDPOINT}"
    assert otel["image"] == COLLECTOR_IMAGE
    _collector_mounts_its_config(ds, otel, "collector-sidecar.yaml")
    assert otel["envFrom"] == [{"secretRef": {"name": "flowtel-collector"}}]
    health_port = int(collector["extensions"]["health_check"]["endpoint"].rsplit(":", 1)[1])
    assert {p["name"]: p["containerPort"] for p in otel["ports"]}["otel-health"] == health_port


def test_gateway_overlay_wires_agents_to_the_gateway_service() -> None:
    docs = render("collector-gateway")
    agent = container(find(docs, "DaemonSet", "flowtel"), "flowtel")
    env = {e["name"]: e.get("value") for e in agent["env"]}
    svc = find(docs, "Service", "flowtel-collector")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "otlp-grpc")
    assert env["OTLP_ENDPOINT"] == f"flowtel-collector.{svc['metadata']['namespace']}.svc.cluster.local:{port}"
    gateway = find(docs, "Deployment", "flowtel-collector")
    otel = container(gateway, "otel-collector")
    assert otel["image"] == COLLECTOR_IMAGE
    _collector_mounts_its_config(gateway, otel, "collector-gateway.yaml")
    assert svc["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    collector = yaml.safe_load(config_map_data(docs, "flowtel-collector-config")["collector-gateway.yaml"])
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(f":{port}")


def _collector_mounts_its_config(workload: dict[str, Any], otel: dict[str, Any], key: str) -> None:
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    (mount,) = [m for m in otel["volumeMounts"] if "configMap" in volumes[m["name"]]]
    cm = volumes[mount["name"]]["configMap"]
    assert cm["name"].startswith("flowtel-collector-config-") and cm["items"] == [{"key": key, "path": key}]
    assert otel["args"] == [f"--config={mount['mountPath']}/{key}"]


def test_collector_configs_are_published_unchanged() -> None:
    data = config_map_data(render("collector-sidecar"), "flowtel-collector-config")
    for key in ("collector-sidecar.yaml", "collector-gateway.yaml"):
        assert data[key] == (REPO / "config" / key).read_text()


def test_prometheus_only_overlay_sends_no_otlp_and_writes_flow_logs_to_the_node() -> None:
    docs = render("prometheus-only")
    cfg = agent_config(docs)
    assert set(cfg["exporters"]) == {"prometheus", "file"}
    ds = find(docs, "DaemonSet", "flowtel")
    agent = container(ds, "flowtel")
    assert "OTLP_ENDPOINT" not in {e["name"] for e in agent["env"]}
    log_dir = cfg["exporters"]["file"]["path"].rsplit("/", 1)[0]
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == log_dir)
    volume = next(v for v in pod_spec(ds)["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"] == {"path": "/var/log/flowtel", "type": "DirectoryOrCreate"}
    assert not mount.get("readOnly")


# --- the agent config each variant mounts ----------------------------------------------------


def _environ(docs: list[dict[str, Any]]) -> dict[str, str]:
    agent = container(find(docs, "DaemonSet", "flowtel"), "flowtel")
    return {e["name"]: e.get("value", f"<{e['name']} from the Downward API>") for e in agent["env"]}


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_agent_config_is_valid_for_the_registered_components(name: str) -> None:
    docs = render(name)
    data = agent_config(docs)
    environ = _environ(docs)
    # Every ${env:X} without a default is set in the container.
    text = config_map_data(docs, "flowtel-config")["config.yaml"]
    for var, default in _ENV_REF.findall(text):
        assert default or var in environ, f"config uses ${{env:{var}}} but the DaemonSet does not set {var}"
    # Raises ConfigError naming the key path on any unknown component type, key or bad value.
    parsed = parse_config(data, f"{name}/flowtel.yaml", factories=factories_by_kind(), environ=environ)
    assert parsed.pipelines, "no pipeline to validate"
    assert {"ebpf", "fqdnpolicy", "health_check"} <= {*parsed.components[Kind.RECEIVER],
                                                      *parsed.components[Kind.EXTENSION]}


def test_the_config_check_rejects_unknown_keys_and_component_types() -> None:
    from flowtel.config import ConfigError

    docs = render("base")
    data = agent_config(docs)
    data["receivers"]["ebpf"]["interfaecs"] = ["veth*"]
    with pytest.raises(ConfigError, match=r"receivers\.ebpf\.interfaecs: unknown key"):
        parse_config(data, "x.yaml", factories=factories_by_kind(), environ=_environ(docs))
    data = agent_config(docs)
    data["receivers"]["fqdnpolcy"] = data["receivers"].pop("fqdnpolicy")
    data["service"]["pipelines"]["logs"]["receivers"] = ["ebpf", "fqdnpolcy"]
    with pytest.raises(ConfigError, match="fqdnpolcy"):
        parse_config(data, "x.yaml", factories=factories_by_kind(), environ=_environ(docs))


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_differ_from_the_base_where_they_say(name: str) -> None:
    base = agent_config(render("base"))
    mine = agent_config(render(name))
    assert mine["receivers"] == base["receivers"]
    assert mine["connectors"] == base["connectors"]
    assert mine["exporters"] != base["exporters"]
    for pipeline in ("logs", "metrics"):
        assert mine["service"]["pipelines"][pipeline]["receivers"] == base["service"]["pipelines"][pipeline]["receivers"]
