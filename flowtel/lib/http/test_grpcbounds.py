"""The gRPC bounds against a real grpc server on loopback: the call beyond the cap and an
oversized request are RESOURCE_EXHAUSTED, and the server keeps answering."""
from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Iterator

import grpc
import pytest

from flowtel.lib.http.grpcbounds import GRPCLimits, server_kwargs


class _Handler(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        if details.method == "/t.T/Hold":
            def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
                self.started.release()
                self.release.wait(10)
                return b"held"
            return grpc.unary_unary_rpc_method_handler(hold)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok:" + request[:10])


@pytest.fixture
def server() -> Iterator[tuple[str, _Handler]]:
    limits = GRPCLimits(max_concurrent_rpcs=2, max_receive_message_bytes=1024, workers=4)
    handler = _Handler()
    srv = grpc.server(futures.ThreadPoolExecutor(limits.workers), handlers=[handler], **server_kwargs(limits))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", handler
    handler.release.set()
    srv.stop(1).wait(5)


def test_calls_beyond_the_cap_and_large_requests_are_resource_exhausted(server: tuple[str, _Handler]) -> None:
    target, handler = server
    with grpc.insecure_channel(target) as channel:
        hold = channel.unary_unary("/t.T/Hold")
        echo = channel.unary_unary("/t.T/Echo")
        held = [hold.future(b"") for _ in range(2)]
        assert handler.started.acquire(timeout=5) and handler.started.acquire(timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            echo(b"x", timeout=5)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        handler.release.set()
        assert [f.result(timeout=5) for f in held] == [b"held", b"held"]
        assert echo(b"again", timeout=5) == b"ok:again"
        with pytest.raises(grpc.RpcError) as info:
            echo(b"x" * 2048, timeout=5)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert echo(b"small", timeout=5) == b"ok:small"
