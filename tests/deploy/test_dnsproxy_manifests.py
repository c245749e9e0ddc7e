"""The DNS proxy's DaemonSet, ServiceAccount and RBAC (deploy/base/dnsproxy) as every
kustomization renders them: least privilege (RBAC exactly what its informers watch,
list/watch only; capabilities instead of privileged), the mounts that keep enforcement across
restarts, probes on what the proxy serves, and arguments the real CLI accepts.
(Schema validity of every rendered document is test_manifests.py's.)"""
from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k8s

from dnsproxy.datapath import DEFAULT_PIN_DIR
from dnsproxy.kube import KubeSource
from flowtel.cli import build_parser
from tests.deploy.manifests import KUSTOMIZATIONS, container, find, pod_spec, render

NAME = "flowtel-dnsproxy"
# Verified with the e2e policy test under a bounded capability set (see daemonset.yaml).
CAPABILITIES = {"BPF", "NET_ADMIN", "NET_BIND_SERVICE", "SYS_RESOURCE"}
# The API group of each resource an informer of dnsproxy/kube.py watches.
GROUPS = {"pods": "", "namespaces": "", "services": "", "ciliumnetworkpolicies": "cilium.io",
          "ciliumclusterwidenetworkpolicies": "cilium.io"}


def proxy_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return container(find(docs, "DaemonSet", NAME), "dnsproxy")


def parsed_args(docs: list[dict[str, Any]]) -> Any:
    """The container's arguments through flowtel's own parser (after the image's entrypoint)."""
    args = proxy_container(docs)["args"]
    assert args[:2] == ["flowtel", "dnsproxy"]
    return build_parser().parse_args(args[1:])


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rbac_is_exactly_what_the_informers_watch(name: str) -> None:
    docs = render(name)
    role = find(docs, "ClusterRole", NAME)
    granted = set()
    for rule in role["rules"]:
        # list + watch is all an informer does: not even get.
        assert set(rule["verbs"]) == {"list", "watch"}, rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        granted |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    # What the code watches, from the code (no request is made: the informers are not started).
    source = KubeSource(k8s.ApiClient(), "node-1")
    assert granted == {(GROUPS[r], r) for r in source.informers}
    binding = find(docs, "ClusterRoleBinding", NAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": "flowtel"}]
    ds = find(docs, "DaemonSet", NAME)
    assert pod_spec(ds)["serviceAccountName"] == find(docs, "ServiceAccount", NAME)["metadata"]["name"]
    # The agent's role no longer grants the proxy's resources: each account reads only its own.
    agent = find(docs, "ClusterRole", "flowtel")
    assert not any("cilium.io" in rule["apiGroups"] for rule in agent["rules"])


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_capabilities_not_privileged(name: str) -> None:
    docs = render(name)
    spec = pod_spec(find(docs, "DaemonSet", NAME))
    sc = proxy_container(docs)["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == sorted(CAPABILITIES)
    assert spec["hostNetwork"] is True and spec.get("hostPID", False) is False and spec.get("hostIPC", False) is False
    assert [c["name"] for c in spec["containers"]] == ["dnsproxy"]


def test_mounts_keep_the_pinned_state_and_give_bcc_its_headers() -> None:
    docs = render("base")
    ds = find(docs, "DaemonSet", NAME)
    volumes = {v["name"]: v for v in pod_spec(ds)["volumes"]}
    mounts = {m["mountPath"]: m for m in proxy_container(docs)["volumeMounts"]}
    host = {path: volumes[m["name"]].get("hostPath", {}).get("path") for path, m in mounts.items()}
    # The pinned maps live under the host's bpffs, at the path the proxy pins to by default.
    bpffs = next(path for path, h in host.items() if h == "/sys/fs/bpf")
    assert bpffs == "/sys/fs/bpf" and DEFAULT_PIN_DIR.startswith(bpffs + "/")
    assert not mounts[bpffs].get("readOnly")
    assert parsed_args(docs).pin_dir == DEFAULT_PIN_DIR
    assert host["/host/lib/modules"] == "/lib/modules" and host["/usr/src"] == "/usr/src"
    assert mounts["/host/lib/modules"]["readOnly"] is True and mounts["/usr/src"]["readOnly"] is True
    for path in ("/lib/modules", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]["name"]], path
    # Nothing of the host beyond that: no /proc, no tracefs, no container runtime socket.
    assert {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v} == {"/sys/fs/bpf", "/lib/modules", "/usr/src"}


def test_args_env_probes_and_resources() -> None:
    docs = render("base")
    ds = find(docs, "DaemonSet", NAME)
    proxy = proxy_container(docs)
    args = parsed_args(docs)
    assert args.kube is True and not args.pods and not args.policies
    env = {e["name"]: e for e in proxy["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # Probes hit the health endpoint where the arguments put it (loopback; hostNetwork).
    host, port = args.health_listen.rsplit(":", 1)
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = proxy[probe]["httpGet"]
        assert (get["host"], get["port"]) == (host, int(port)), probe
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    # Metrics: where the scrape annotations and the declared port say.
    metrics_port = int(args.metrics_listen.rsplit(":", 1)[1])
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"metrics": metrics_port}
    res = proxy["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) & set(res["limits"])
    # ~225 MB resident measured (bcc's LLVM included): the request must cover it.
    assert res["requests"]["memory"] == "256Mi" and res["limits"]["memory"] == "512Mi"


def test_rollout_one_node_at_a_time_without_surge() -> None:
    ds = find(render("base"), "DaemonSet", NAME)
    strategy = ds["spec"]["updateStrategy"]
    # A surge pod would share the node's network namespace and contend for :53 and the ports.
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    assert pod_spec(ds)["priorityClassName"] == "system-node-critical"
    assert pod_spec(ds)["tolerations"] == [{"operator": "Exists"}]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_proxy_ports_do_not_collide_with_the_agent_on_the_node(name: str) -> None:
    docs = render(name)
    args = parsed_args(docs)
    mine = {int(args.health_listen.rsplit(":", 1)[1]), int(args.metrics_listen.rsplit(":", 1)[1])}
    agent_ds = find(docs, "DaemonSet", "flowtel")
    agent_ports = {p["containerPort"] for c in pod_spec(agent_ds)["containers"] for p in c.get("ports", [])}
    assert not mine & agent_ports, mine & agent_ports


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_proxy_runs_the_agents_image(name: str) -> None:
    """One image (it has `nft` for the proxy), so an overlay's `images:` moves both together."""
    docs = render(name)
    agent = container(find(docs, "DaemonSet", "flowtel"), "flowtel")
    assert proxy_container(docs)["image"] == agent["image"] and ":" in agent["image"]
