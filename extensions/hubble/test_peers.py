"""Peer/Notify from the Kubernetes API: the agent DaemonSet's running, ready pods, through
the project's informer against the list/watch API stand-in, over real gRPC."""
from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from extensions.hubble.config import PeersConfig
from extensions.hubble.peer import PeerRegistry, PeerService, strip_pod, watch_agent_pods
from flowtel.component import Telemetry
from flowtel.lib.hubble.api.peer import peer_pb2, peer_pb2_grpc
from tests.kubeapi import FakeApiServer
from tests.kubeapi import objects as o

AGENT = {"app.kubernetes.io/name": "flowtel"}


def _stream(stub: peer_pb2_grpc.PeerStub) -> tuple[Any, "queue.Queue[peer_pb2.ChangeNotification]"]:
    call = stub.Notify(peer_pb2.NotifyRequest(), timeout=60)
    q: queue.Queue[peer_pb2.ChangeNotification] = queue.Queue()

    def pump() -> None:
        try:
            for note in call:
                q.put(note)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()
    return call, q


def _take(q: "queue.Queue[peer_pb2.ChangeNotification]", n: int) -> list[tuple[str, str, int, str | None]]:
    out = []
    for _ in range(n):
        note = q.get(timeout=15)
        out.append((note.name, note.address, note.type, note.tls.server_name if note.HasField("tls") else None))
    return out


def test_notify_lists_agents_then_follows_changes(tmp_path: Path) -> None:
    stopping = threading.Event()
    registry = PeerRegistry()
    with FakeApiServer(bookmark_interval=0.1) as api:
        api.create("pods", o.pod("flowtel-a", "flowtel", ip="10.0.0.1", node="node-a", labels=AGENT))
        api.create("pods", o.pod("flowtel-b", "flowtel", ip="fd00::2", node="node-b", labels=AGENT))
        api.create("pods", o.pod("flowtel-pending", "flowtel", ip="10.0.0.9", node="node-c", labels=AGENT, phase="Pending"))
        api.create("pods", o.pod("web", "flowtel", ip="10.0.0.5", node="node-a"))  # not an agent
        api.create("pods", o.pod("flowtel-x", "other", ip="10.0.0.6", node="node-a", labels=AGENT))  # other namespace
        kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
        cfg = PeersConfig(auth_type="kubeConfig", kubeconfig=kubeconfig, namespace="flowtel")
        informer = watch_agent_pods("hubble", cfg, registry, port=4244, tls=True, telemetry=Telemetry(),
                                    on_health=lambda e: None)
        server = grpc.server(futures.ThreadPoolExecutor(4))
        peer_pb2_grpc.add_PeerServicer_to_server(PeerService(registry, stopping), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            assert informer.synced.wait(15)
            call, q = _stream(peer_pb2_grpc.PeerStub(channel))
            assert sorted(_take(q, 2)) == [
                ("node-a", "10.0.0.1:4244", peer_pb2.PEER_ADDED, "node-a.default.hubble-grpc.cilium.io"),
                ("node-b", "[fd00::2]:4244", peer_pb2.PEER_ADDED, "node-b.default.hubble-grpc.cilium.io"),
            ]
            api.patch("pods", "flowtel-pending", lambda p: p["status"].update(phase="Running"), namespace="flowtel")
            assert _take(q, 1) == [("node-c", "10.0.0.9:4244", peer_pb2.PEER_ADDED,
                                    "node-c.default.hubble-grpc.cilium.io")]
            api.delete("pods", "flowtel-a", namespace="flowtel")
            assert _take(q, 1) == [("node-a", "10.0.0.1:4244", peer_pb2.PEER_DELETED,
                                    "node-a.default.hubble-grpc.cilium.io")]
            # an agent restarted on node-b with a new IP: one update, the new address
            api.patch("pods", "flowtel-b", lambda p: p["status"].update(podIP="fd00::3"), namespace="flowtel")
            assert _take(q, 1) == [("node-b", "[fd00::3]:4244", peer_pb2.PEER_UPDATED,
                                    "node-b.default.hubble-grpc.cilium.io")]
            call.cancel()
        finally:
            stopping.set()
            informer.request_stop()
            informer.join()
            channel.close()
            server.stop(0)


def test_tls_field_only_with_tls_and_cluster_names(tmp_path: Path) -> None:
    registry = PeerRegistry()
    with FakeApiServer(bookmark_interval=0.1) as api:
        api.create("pods", o.pod("flowtel-a", "flowtel", ip="10.0.0.1", node="node.a", labels=AGENT))
        cfg = PeersConfig(auth_type="kubeConfig", kubeconfig=api.write_kubeconfig(str(tmp_path / "k")),
                          namespace="flowtel", cluster_name="prod.eu")
        informer = watch_agent_pods("hubble", cfg, registry, port=4245, tls=False, telemetry=Telemetry(),
                                    on_health=lambda e: None)
        try:
            deadline = time.monotonic() + 15
            while not registry.peers() and time.monotonic() < deadline:
                time.sleep(0.05)
            (peer,) = registry.peers()
            note = peer.notification(peer_pb2.PEER_ADDED)
            assert (note.name, note.address, note.HasField("tls")) == ("prod.eu/node.a", "10.0.0.1:4245", False)
        finally:
            informer.request_stop()
            informer.join()


def test_unready_or_terminating_pods_are_no_peers() -> None:
    pod = o.pod("flowtel-a", "flowtel", ip="10.0.0.1", node="node-a", labels=AGENT)
    assert strip_pod(pod) is not None and strip_pod(pod).ready  # type: ignore[union-attr]
    pod["status"]["conditions"][0]["status"] = "False"
    assert not strip_pod(pod).ready  # type: ignore[union-attr]
    pod["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert strip_pod(pod) is None
