"""The hubble-relay overlay: Cilium's own Relay and UI wired to flowtel's Hubble API, every
reference checked against what the other side declares (ports, Services, files, labels)."""
from __future__ import annotations

import yaml

from extensions.hubble.config import HubbleConfig, parse_endpoint
from tests.deploy.manifests import agent_config, config_map_data, container, find, pod_spec, render


def _docs() -> list[dict]:
    return render("hubble-relay")


def _mounts(workload: dict, name: str) -> dict[str, str]:
    """Mounted file path -> (volume, key) for a container's projected and configMap volumes."""
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    out: dict[str, str] = {}
    for m in container(workload, name).get("volumeMounts", []):
        vol = volumes[m["name"]]
        sources = vol.get("projected", {}).get("sources", []) or [vol]
        for src in sources:
            ref = src.get("secret") or src.get("configMap") or {}
            for item in ref.get("items", []):
                out[f"{m['mountPath']}/{item['path']}"] = f"{ref.get('name', ref.get('secretName'))}:{item['key']}"
    return out


def test_agent_serves_hubble_where_the_peer_service_points() -> None:
    docs = _docs()
    cfg = HubbleConfig(**agent_config(docs)["extensions"]["hubble"])
    assert "hubble" in agent_config(docs)["service"]["extensions"]
    kind, _, port = parse_endpoint(cfg.endpoint)
    ds = find(docs, "DaemonSet", "flowtel")
    agent = container(ds, "flowtel")
    (declared,) = [p for p in agent["ports"] if p["name"] == "hubble-grpc"]
    assert (kind, declared["containerPort"]) == ("tcp", port) == ("tcp", 4244)
    svc = find(docs, "Service", "hubble-peer")
    assert svc["spec"]["ports"] == [{"name": "peer-service", "port": 443, "targetPort": "hubble-grpc", "protocol": "TCP"}]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    # Peer/Notify finds exactly these pods, and advertises the node's address.
    assert cfg.peers is not None
    for requirement in cfg.peers.label_selector.split(","):
        key, value = requirement.split("=")
        assert pod_labels[key] == value
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # The TLS files the config names are the Secret's keys, mounted.
    mounts = _mounts(ds, "flowtel")
    assert cfg.tls is not None
    assert mounts[cfg.tls.cert_file] == "hubble-server-certs:tls.crt"
    assert mounts[cfg.tls.key_file] == "hubble-server-certs:tls.key"
    assert mounts[cfg.tls.client_ca_file] == "hubble-server-certs:ca.crt"


def test_relay_dials_the_peer_service_with_its_client_certificate() -> None:
    docs = _docs()
    relay = find(docs, "Deployment", "hubble-relay")
    c = container(relay, "hubble-relay")
    assert c["image"].startswith("quay.io/cilium/hubble-relay:v")
    assert c["command"] == ["hubble-relay"] and c["args"] == ["serve"]
    conf = yaml.safe_load(config_map_data(docs, "hubble-relay-config")["config.yaml"])
    host, port = conf["peer-service"].rsplit(":", 1)
    assert host == "hubble-peer.flowtel.svc.cluster.local." and int(port) == 443
    mounts = _mounts(relay, "hubble-relay")
    assert mounts["/etc/hubble-relay/config.yaml"].endswith(":config.yaml")
    assert mounts[conf["tls-hubble-client-cert-file"]] == "hubble-relay-client-certs:tls.crt"
    assert mounts[conf["tls-hubble-client-key-file"]] == "hubble-relay-client-certs:tls.key"
    assert mounts[conf["tls-hubble-server-ca-files"]] == "hubble-relay-client-certs:ca.crt"
    listen = int(conf["listen-address"].rsplit(":", 1)[1])
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"] == [listen]
    assert c["readinessProbe"]["grpc"]["port"] == int(conf["health-listen-address"].rsplit(":", 1)[1])
    svc = find(docs, "Service", "hubble-relay")
    assert svc["spec"]["ports"][0]["port"] == 80 and svc["spec"]["ports"][0]["targetPort"] == "grpc"


def test_ui_reads_flows_from_relay() -> None:
    docs = _docs()
    ui = find(docs, "Deployment", "hubble-ui")
    backend = container(ui, "backend")
    env = {e["name"]: e.get("value") for e in backend["env"]}
    host, port = env["FLOWS_API_ADDR"].split(":")
    relay_svc = find(docs, "Service", "hubble-relay")
    assert host == relay_svc["metadata"]["name"] and int(port) == relay_svc["spec"]["ports"][0]["port"]
    nginx = config_map_data(docs, "hubble-ui-nginx")["nginx.conf"]
    assert f"proxy_pass http://127.0.0.1:{env['EVENTS_SERVER_PORT']};" in nginx
    assert container(ui, "frontend")["image"].startswith("quay.io/cilium/hubble-ui:v")
    assert backend["image"].startswith("quay.io/cilium/hubble-ui-backend:v")
