"""The Observer and Peer services over real gRPC (loopback, free ports, our generated
stubs): Hubble's request semantics, error statuses, bounds, TLS and unix sockets."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from google.protobuf import json_format

from extensions.hubble.config import HubbleConfig, ServerTLSConfig
from extensions.hubble.observer import NodeInfo, ObserverService
from extensions.hubble.peer import Peer, PeerRegistry, PeerService, tls_server_name
from extensions.hubble.server import GrpcServer
from flowtel.component import Telemetry
from flowtel.errors import StartError
from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.api.observer import observer_pb2, observer_pb2_grpc
from flowtel.lib.hubble.api.peer import peer_pb2, peer_pb2_grpc
from flowtel.lib.hubble.api.relay import relay_pb2
from flowtel.lib.hubble.store import FlowStore
from tests.support.certs import make_pki

T0 = 1_700_000_000 * 10**9


def response(i: int, *, verdict: str = "FORWARDED", ns: str = "shop", t: int | None = None) -> observer_pb2.GetFlowsResponse:
    f = json_format.ParseDict({
        "verdict": verdict, "node_name": "node-1", "uuid": f"u-{i}",
        "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 40000 + i, "destination_port": 80}},
        "source": {"namespace": ns, "pod_name": f"web-{i}"},
        "event_type": {"type": 1 if verdict == "DROPPED" else 4},
    }, flow_pb2.Flow())
    f.time.FromNanoseconds(T0 + i * 10**9 if t is None else t)
    resp = observer_pb2.GetFlowsResponse(flow=f, node_name="node-1")
    resp.time.CopyFrom(f.time)
    return resp


class Served:
    def __init__(self, cfg: HubbleConfig, store: FlowStore, registry: PeerRegistry) -> None:
        self.store = store
        self.registry = registry
        self.stopping = threading.Event()
        self.node = NodeInfo("node-1", "flowtel test", tls_server_name("node-1", "default") if cfg.tls else None)
        self.server = GrpcServer("hubble", cfg, [
            (observer_pb2_grpc.add_ObserverServicer_to_server,
             ObserverService(store, self.node, Telemetry(), "hubble", self.stopping)),
            (peer_pb2_grpc.add_PeerServicer_to_server, PeerService(registry, self.stopping)),
        ])
        self.node.address = self.server.endpoint
        self.channel = grpc.insecure_channel(self.server.endpoint) if cfg.tls is None else None
        self.observer = observer_pb2_grpc.ObserverStub(self.channel) if self.channel else None
        self.peer = peer_pb2_grpc.PeerStub(self.channel) if self.channel else None

    def close(self) -> None:
        self.stopping.set()
        self.store.close()
        if self.channel is not None:
            self.channel.close()
        self.server.stop(0.5)


@pytest.fixture
def served() -> Iterator[Served]:
    cfg = HubbleConfig(endpoint="127.0.0.1:0", buffer_size=100, follower_buffer_size=5, max_followers=2,
                       max_concurrent_rpcs=8)
    store = FlowStore(node_name="node-1", capacity=cfg.buffer_size, follower_capacity=cfg.follower_buffer_size,
                      max_followers=cfg.max_followers)
    store.add([response(i, verdict="DROPPED" if i % 3 == 0 else "FORWARDED", ns="shop" if i < 5 else "db")
               for i in range(10)])
    s = Served(cfg, store, PeerRegistry())
    try:
        yield s
    finally:
        s.close()


def uuids(stream: Iterator[observer_pb2.GetFlowsResponse]) -> list[str]:
    return [r.flow.uuid for r in stream]


def test_number_first_and_whole_ring(served: Served) -> None:
    o = served.observer
    assert uuids(o.GetFlows(observer_pb2.GetFlowsRequest(number=3), timeout=10)) == ["u-7", "u-8", "u-9"]
    assert uuids(o.GetFlows(observer_pb2.GetFlowsRequest(number=2, first=True), timeout=10)) == ["u-0", "u-1"]
    # number 0 without follow, and an absurd number, are the whole ring (as Hubble)
    assert len(uuids(o.GetFlows(observer_pb2.GetFlowsRequest(), timeout=10))) == 10
    assert len(uuids(o.GetFlows(observer_pb2.GetFlowsRequest(number=2**64 - 1), timeout=10))) == 10


def test_since_until_and_filters(served: Served) -> None:
    req = observer_pb2.GetFlowsRequest()
    req.since.FromNanoseconds(T0 + 4 * 10**9)
    req.until.FromNanoseconds(T0 + 6 * 10**9)
    assert uuids(served.observer.GetFlows(req, timeout=10)) == ["u-4", "u-5", "u-6"]
    req = observer_pb2.GetFlowsRequest(
        whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])],
        blacklist=[flow_pb2.FlowFilter(source_pod=["db/"])])
    assert uuids(served.observer.GetFlows(req, timeout=10)) == ["u-0", "u-3"]


def test_field_mask(served: Served) -> None:
    req = observer_pb2.GetFlowsRequest(number=1)
    req.field_mask.paths.extend(["uuid", "source.namespace"])
    (resp,) = list(served.observer.GetFlows(req, timeout=10))
    assert json_format.MessageToDict(resp.flow) == {"uuid": "u-9", "source": {"namespace": "db"}}
    assert resp.node_name == "node-1"


@pytest.mark.parametrize("req,message", [
    (observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(source_ip=["10.0.0.300"])]), "invalid IP address"),
    (observer_pb2.GetFlowsRequest(blacklist=[flow_pb2.FlowFilter(protocol=["quic"])]), "unknown protocol"),
    (observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(dns_query=["(a"])]), "invalid regular expression"),
    (observer_pb2.GetFlowsRequest(first=True, follow=True), "first cannot be specified with follow"),
    (observer_pb2.GetFlowsRequest(field_mask={"paths": ["nope"]}), "invalid field_mask"),
    (observer_pb2.GetFlowsRequest(since={"seconds": 2**62}), "invalid since timestamp"),
    (observer_pb2.GetFlowsRequest(since={"seconds": 10}, until={"seconds": 5}), "since must not be after until"),
    (observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(
        experimental=flow_pb2.FlowFilter.Experimental(cel_expression=["true"]))]), "CEL"),
])
def test_invalid_requests_get_invalid_argument(served: Served, req: observer_pb2.GetFlowsRequest, message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(served.observer.GetFlows(req, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    # and the server still answers
    assert len(uuids(served.observer.GetFlows(observer_pb2.GetFlowsRequest(number=1), timeout=10))) == 1


def test_follow_gets_new_flows_and_reports_its_losses(served: Served) -> None:
    call = served.observer.GetFlows(observer_pb2.GetFlowsRequest(number=1, follow=True), timeout=30)
    first = next(call)
    assert first.flow.uuid == "u-9"
    served.store.add([response(10)])
    assert next(call).flow.uuid == "u-10"
    # A follower with room for 5 that is sent 12 at once loses 7, and is told so first.
    served.store.add([response(100 + i) for i in range(12)])
    got = [next(call) for _ in range(6)]
    assert [r.flow.uuid for r in got[:5]] == [f"u-{100 + i}" for i in range(5)]
    assert got[5].WhichOneof("response_types") == "lost_events"
    assert got[5].lost_events.source == flow_pb2.HUBBLE_RING_BUFFER
    assert got[5].lost_events.num_events_lost == 7
    call.cancel()


def test_follow_with_number_zero_only_new(served: Served) -> None:
    call = served.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True), timeout=30)
    threading.Timer(0.3, lambda: served.store.add([response(42)])).start()
    assert next(call).flow.uuid == "u-42"
    call.cancel()


def test_too_many_followers_is_resource_exhausted(served: Served) -> None:
    calls = [served.observer.GetFlows(observer_pb2.GetFlowsRequest(number=1, follow=True), timeout=30) for _ in range(2)]
    for c in calls:
        next(c)
    with pytest.raises(grpc.RpcError) as info:
        list(served.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True), timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for c in calls:
        c.cancel()
    # the slots come back once the streams are gone
    deadline = time.monotonic() + 10
    while served.store.stats()["followers"] and time.monotonic() < deadline:
        time.sleep(0.05)
    call = served.observer.GetFlows(observer_pb2.GetFlowsRequest(number=1, follow=True), timeout=30)
    assert next(call).flow.uuid == "u-9"
    call.cancel()


def test_status_nodes_namespaces_and_events(served: Served) -> None:
    o = served.observer
    st = o.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
    assert (st.num_flows, st.max_flows, st.seen_flows) == (10, 100, 10)
    assert st.num_connected_nodes.value == 1 and st.HasField("num_unavailable_nodes")
    (node,) = o.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes
    assert (node.name, node.state, node.address, node.tls.enabled) == ("node-1", relay_pb2.NODE_CONNECTED,
                                                                       served.server.endpoint, False)
    assert node.num_flows == 10
    ns = o.GetNamespaces(observer_pb2.GetNamespacesRequest(), timeout=10).namespaces
    assert [n.namespace for n in ns] == ["db", "shop"]
    assert list(o.GetAgentEvents(observer_pb2.GetAgentEventsRequest(number=10), timeout=10)) == []
    assert list(o.GetDebugEvents(observer_pb2.GetDebugEventsRequest(number=10), timeout=10)) == []
    call = o.GetAgentEvents(observer_pb2.GetAgentEventsRequest(follow=True), timeout=1.5)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # open, empty, until the client leaves


def test_oversized_request_is_refused(served: Served) -> None:
    req = observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(source_pod=["x" * 1000] * 2000)])
    with pytest.raises(grpc.RpcError) as info:
        list(served.observer.GetFlows(req, timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_peer_notify_snapshot_then_changes(served: Served) -> None:
    served.registry.upsert("a", Peer("node-1", "10.0.0.1:4244", None))
    call = served.peer.Notify(peer_pb2.NotifyRequest(), timeout=30)
    first = next(call)
    assert (first.name, first.address, first.type, first.HasField("tls")) == ("node-1", "10.0.0.1:4244",
                                                                             peer_pb2.PEER_ADDED, False)
    served.registry.upsert("b", Peer("node-2", "10.0.0.2:4244", None))
    assert (next(call).name, ) == ("node-2",)
    served.registry.delete("a")
    gone = next(call)
    assert (gone.name, gone.type) == ("node-1", peer_pb2.PEER_DELETED)
    call.cancel()


def test_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    cfg = HubbleConfig(endpoint="127.0.0.1:0", tls=ServerTLSConfig(
        cert_file=str(pki.server_cert), key_file=str(pki.server_key), client_ca_file=str(pki.ca_file)))
    store = FlowStore(node_name="node-1", capacity=10, follower_capacity=10, max_followers=2)
    store.add([response(1)])
    s = Served(cfg, store, PeerRegistry())
    try:
        target = f"localhost:{s.server.port}"
        good = grpc.secure_channel(target, grpc.ssl_channel_credentials(
            pki.read(pki.ca_file), pki.read(pki.client_key), pki.read(pki.client_cert)))
        st = observer_pb2_grpc.ObserverStub(good).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
        assert st.num_flows == 1
        (node,) = observer_pb2_grpc.ObserverStub(good).GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes
        assert node.tls.enabled and node.tls.server_name == "node-1.default.hubble-grpc.cilium.io"
        good.close()
        anonymous = grpc.secure_channel(target, grpc.ssl_channel_credentials(pki.read(pki.ca_file)))
        with pytest.raises(grpc.RpcError) as info:
            observer_pb2_grpc.ObserverStub(anonymous).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        anonymous.close()
    finally:
        s.close()


def test_unix_socket_refuses_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep me")
    sock = tmp_path / "hubble.sock"
    sock.symlink_to(target)
    with pytest.raises(StartError, match="is a symlink"):
        GrpcServer("hubble", HubbleConfig(endpoint=f"unix://{sock}"), [])
    assert target.read_text() == "keep me"
    link_dir = tmp_path / "linkdir"
    link_dir.symlink_to(tmp_path)
    with pytest.raises(StartError, match="not a symlink"):
        GrpcServer("hubble", HubbleConfig(endpoint=f"unix://{link_dir}/h.sock"), [])


def test_unix_socket_serves_and_replaces_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "hubble.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # left behind, as after a crash
    cfg = HubbleConfig(endpoint=f"unix://{path}")
    store = FlowStore(node_name="node-1", capacity=10, follower_capacity=10, max_followers=2)
    store.add([response(1)])
    s = Served(cfg, store, PeerRegistry())
    try:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o660)
        assert uuids(s.observer.GetFlows(observer_pb2.GetFlowsRequest(number=5), timeout=10)) == ["u-1"]
    finally:
        s.close()
    assert not path.exists()


def test_port_in_use_is_a_start_error() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(StartError, match="cannot listen"):
            GrpcServer("hubble", HubbleConfig(endpoint=f"127.0.0.1:{holder.getsockname()[1]}"), [])
    finally:
        holder.close()
