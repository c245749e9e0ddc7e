"""A client of Hubble's Observer API: flowtel's ``hubble`` extension or Hubble Relay.

``flowtel observe``, ``flowtel map`` and ``flowtel policy suggest`` read flows only through
this, with the same flags the ``hubble`` CLI has for the connection (``--server``,
``--tls``, ``--tls-ca-cert-files``, ``--tls-client-cert-file``, ``--tls-client-key-file``,
``--tls-server-name``). Errors the user can act on (unreachable server, refused request,
unreadable certificate) come back as :class:`ClientError` with the server's own message.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from flowtel.lib.hubble.api.observer import observer_pb2

if TYPE_CHECKING:
    import grpc

DEFAULT_SERVER = "127.0.0.1:4244"  # the hubble extension's default endpoint (Hubble's port)
CONNECT_TIMEOUT = 5.0
# Responses are flows of a few hundred bytes; a ring of 1M would still fit far below this.
MAX_MESSAGE = 64 << 20


class ClientError(Exception):
    """What went wrong talking to the server; ``code`` 2 when the request itself was invalid."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Connection:
    server: str
    tls: bool = False
    ca_files: tuple[str, ...] = ()
    client_cert_file: str = ""
    client_key_file: str = ""
    server_name: str = ""


def add_connection_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--server", default=os.environ.get("FLOWTEL_SERVER", DEFAULT_SERVER), metavar="ADDRESS",
        help=f"a Hubble API: an agent's hubble extension or Hubble Relay, HOST:PORT or unix:///PATH "
             f"(default: $FLOWTEL_SERVER or {DEFAULT_SERVER})")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (implied by the other --tls-* flags)")
    parser.add_argument("--tls-ca-cert-files", action="append", default=[], metavar="FILE",
                        help="PEM CA certificates to verify the server (default: the system's)")
    parser.add_argument("--tls-client-cert-file", default="", metavar="FILE", help="PEM client certificate for mTLS")
    parser.add_argument("--tls-client-key-file", default="", metavar="FILE", help="PEM key of the client certificate")
    parser.add_argument("--tls-server-name", default="", metavar="NAME",
                        help="name to verify the server's certificate against (e.g. "
                             "node-1.default.hubble-grpc.cilium.io)")


def connection_from_args(args: argparse.Namespace) -> Connection:
    tls = bool(args.tls or args.tls_ca_cert_files or args.tls_client_cert_file or args.tls_server_name)
    if bool(args.tls_client_cert_file) != bool(args.tls_client_key_file):
        raise ClientError("--tls-client-cert-file and --tls-client-key-file go together", 2)
    return Connection(args.server, tls, tuple(args.tls_ca_cert_files), args.tls_client_cert_file,
                      args.tls_client_key_file, args.tls_server_name)


def _target(server: str) -> str:
    if server.startswith("unix://"):
        return "unix:" + server[len("unix://"):]
    for scheme in ("http://", "https://", "grpc://", "grpcs://"):
        if server.startswith(scheme):
            raise ClientError(f"--server takes HOST:PORT or unix:///PATH, without {scheme} (got {server!r})", 2)
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClientError(f"--server: expected HOST:PORT or unix:///PATH, got {server!r}", 2)
    return server


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ClientError(f"{flag}: cannot read {path}: {exc.strerror or exc}", 2) from None


def channel(conn: Connection) -> grpc.Channel:
    # grpc (and the generated stubs, which import it) load when a command connects, not for
    # its --help: the client commands stay light (tests/contracts/test_cli_imports.py).
    import grpc

    target = _target(conn.server)
    options: list[tuple[str, object]] = [("grpc.max_receive_message_length", MAX_MESSAGE)]
    if not conn.tls:
        return grpc.insecure_channel(target, options=options)
    ca = b"".join(_read(p, "--tls-ca-cert-files") for p in conn.ca_files) or None
    key = _read(conn.client_key_file, "--tls-client-key-file") if conn.client_key_file else None
    cert = _read(conn.client_cert_file, "--tls-client-cert-file") if conn.client_cert_file else None
    if conn.server_name:
        options.append(("grpc.ssl_target_name_override", conn.server_name))
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert), options=options)


def rpc_error(conn: Connection, exc: grpc.RpcError) -> ClientError:
    import grpc

    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ClientError(f"the server refused the request: {details}", 2)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ClientError(
            f"cannot reach a Hubble API at {conn.server}: {details}. Is the agent running with the hubble "
            "extension (service.extensions: [hubble]), or is this Hubble Relay's address? Point --server at it "
            "(and add --tls… flags if it serves TLS).")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ClientError(f"the server is at its limit: {details}; retry later")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"{conn.server} did not answer in time: {details}")
    name = code.name if code is not None else "error"
    return ClientError(f"the Hubble API at {conn.server} failed ({name}): {details}")


class ObserverClient:
    """One connection; ``get_flows`` streams responses, raising ClientError on failure."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        from flowtel.lib.hubble.api.observer import observer_pb2_grpc

        self._channel = channel(conn)
        self.stub = observer_pb2_grpc.ObserverStub(self._channel)

    def __enter__(self) -> "ObserverClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float = CONNECT_TIMEOUT) -> None:
        import grpc

        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ClientError(
                f"cannot reach a Hubble API at {self.conn.server} within {timeout:g}s. Is the agent running with "
                "the hubble extension (service.extensions: [hubble]), or is this Hubble Relay's address? Point "
                "--server at it (and add --tls… flags if it serves TLS).") from None

    def get_flows(self, request: observer_pb2.GetFlowsRequest,
                  timeout: float | None = None) -> Iterator[observer_pb2.GetFlowsResponse]:
        import grpc

        self.wait_ready()
        call = self.stub.GetFlows(request, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise rpc_error(self.conn, exc) from None
        finally:
            call.cancel()

    def server_status(self, timeout: float = 10.0) -> observer_pb2.ServerStatusResponse:
        import grpc

        self.wait_ready()
        try:
            return self.stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise rpc_error(self.conn, exc) from None
