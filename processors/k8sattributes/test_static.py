"""The static source: the same endpoints as the API source, from a file of IPs and CIDRs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pytest

from flowtel.component import CreateSettings, Telemetry
from flowtel.errors import StartError
from flowtel.records import Endpoint, Flow, Verdict
from processors.k8sattributes.config import K8sAttributesConfig
from processors.k8sattributes.processor import K8sAttributesProcessor
from tests.kubeapi import FakeApiServer
from tests.kubeapi import objects as o

TESTDATA = Path(__file__).parent / "testdata"


def static_processor(path: Path | str, node_name: str = "node-1") -> K8sAttributesProcessor:
    cfg = K8sAttributesConfig.model_validate({"source": "static", "static": {"path": str(path)}})
    p = K8sAttributesProcessor(CreateSettings("k8sattributes", node_name, Telemetry()), cfg)
    p.start()
    return p


def ends(p: K8sAttributesProcessor, src: str, dst: str) -> tuple[Endpoint, Endpoint]:
    f = Flow(time.time_ns(), "node-1", Verdict.FORWARDED, 4, src, dst, 6, 1, 2)
    (f,) = p.process([f])
    assert isinstance(f, Flow) and f.source is not None and f.destination is not None
    return f.source, f.destination


def test_static_and_api_sources_give_the_same_endpoints(api: FakeApiServer, make_processor: Callable[..., K8sAttributesProcessor]) -> None:
    # The cluster testdata/static.yaml describes, served by the API.
    api.create("namespaces", o.namespace("shop", {"team": "pay"}))
    api.create("nodes", o.node("node-1", internal_ip="192.168.0.1"))
    api.create("nodes", o.node("node-2", internal_ip="192.168.0.2"))
    api.create("replicasets", o.replicaset("web-7c9d", "shop", deployment="web"))
    api.create("pods", o.pod("web-7c9d-abcde", "shop", ip="10.0.1.5", labels={"app": "web", "pod-template-hash": "7c9d"},
                             owner=("ReplicaSet", "web-7c9d"), uid="0b7e2d5c-0000-4000-8000-000000000001"))
    api.create("services", o.service("web", "shop", cluster_ip="10.96.0.20"))
    api.create("services", o.service("kubernetes", "default", cluster_ip="10.96.0.1"))
    api.create("endpointslices", o.endpointslice(addresses=("192.168.0.2",)))
    from_api = make_processor()
    from_file = static_processor(TESTDATA / "static.yaml")
    try:
        for src, dst in (("10.0.1.5", "10.96.0.20"), ("192.168.0.1", "192.168.0.2"), ("10.0.1.5", "1.1.1.1")):
            assert ends(from_file, src, dst) == ends(from_api, src, dst), (src, dst)
        # The API's own ClusterIP: the API source also names the service; identity and labels agree.
        a, b = ends(from_file, "10.0.1.5", "10.96.0.1")[1], ends(from_api, "10.0.1.5", "10.96.0.1")[1]
        assert (a.identity, a.labels) == (b.identity, b.labels) == (7, ("reserved:kube-apiserver",))
    finally:
        from_file.shutdown()


def test_cidrs_longest_prefix_and_exact_addresses_first() -> None:
    p = static_processor(TESTDATA / "static.yaml", node_name="node-2")
    try:
        assert ends(p, "10.50.9.9", "10.50.3.4")[0].pod_name == "legacy-vms"
        assert ends(p, "10.50.9.9", "10.50.3.4")[1].pod_name == "legacy-db"  # the /24 beats the /16
        host, remote = ends(p, "192.168.0.2", "192.168.0.1")  # this agent is node-2 now
        assert list(host.labels) == ["reserved:host", "reserved:kube-apiserver"] and host.identity == 1
        assert list(remote.labels) == ["reserved:remote-node"]
        assert list(ends(p, "10.0.1.5", "8.8.8.8")[1].labels) == ["reserved:world"]
    finally:
        p.shutdown()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pods: [{name: a, ips: [10.0.0.300]}]", "pods[0].ips[0]: expected an IP address or CIDR, got '10.0.0.300'"),
        ("pods: [{name: a}]", "pods[0].ips: Field required"),
        ("pod: []", "pod: unknown key"),
        ("pods: [{name: a, ips: [10.0.0.1]", "is not valid YAML"),
    ],
)
def test_file_errors_stop_the_agent_with_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(text)
    with pytest.raises(StartError) as info:
        static_processor(path)
    assert message in info.value.problem and str(path) in info.value.problem


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StartError) as info:
        static_processor(tmp_path / "nope.yaml")
    assert "cannot read the static metadata file" in info.value.problem
