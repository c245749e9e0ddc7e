"""The gRPC server of the ``hubble`` extension: bounded in every dimension a client controls.

- ``maximum_concurrent_rpcs``: further RPCs get ``RESOURCE_EXHAUSTED`` at once (gRPC's own
  check, before any handler runs); follow streams have their own lower cap in the store.
- message sizes both ways, keepalive pings, an idle-connection limit, and a limit on pings
  without data, so a dead or abusive peer does not hold a connection or a thread.
- ``unix://`` sockets: the parent directory must exist and be a real directory (not a
  symlink); a stale socket left by a previous run is removed, anything else at the path (a
  planted symlink, a file) stops the agent; the socket is made 0660 through an O_PATH
  descriptor of the socket itself, never by following the path again.
"""
from __future__ import annotations

import os
import stat
import threading
from concurrent import futures
from typing import Sequence

import grpc

from extensions.hubble.config import HubbleConfig, ServerTLSConfig, parse_endpoint
from flowtel.errors import StartError

SOCKET_MODE = 0o660


def server_options(cfg: HubbleConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", cfg.max_recv_message_size),
        ("grpc.max_send_message_length", cfg.max_send_message_size),
        ("grpc.max_metadata_size", 16 << 10),  # headers of a request (as flowtel.lib.http.grpcbounds)
        ("grpc.keepalive_time_ms", int(cfg.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout * 1000)),
        ("grpc.max_connection_idle_ms", int(cfg.max_connection_idle * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients may ping (Relay does, every 30 s by default) but not flood.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 3),
        ("grpc.max_concurrent_streams", cfg.max_concurrent_rpcs),
        ("grpc.so_reuseport", 0),
    ]


def _read(owner: str, path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise StartError(owner, f"cannot read the {what} {path}: {exc.strerror or exc}",
                         f"set extensions.{owner}.tls.{what} to a readable PEM file") from None


def credentials(owner: str, tls: ServerTLSConfig) -> grpc.ServerCredentials:
    cert = _read(owner, tls.cert_file, "cert_file")
    key = _read(owner, tls.key_file, "key_file")
    ca = _read(owner, tls.client_ca_file, "client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def prepare_unix_socket(owner: str, path: str) -> None:
    """Refuse what a planted path could make us do; remove our own stale socket."""
    parent = os.path.dirname(path) or "/"
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        os.close(fd)
    except OSError as exc:
        raise StartError(owner, f"cannot use {parent} for the socket {path}: {exc.strerror or exc}",
                         f"create {parent} as a real directory (not a symlink) writable only by the agent") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode):
        os.unlink(path)  # lstat said socket, not a symlink: a previous run's
        return
    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
    raise StartError(owner, f"{path} exists and is {kind}; refusing to replace it",
                     f"remove {path} if it is not needed, or set extensions.{owner}.endpoint to another path")


def restrict_unix_socket(owner: str, path: str) -> None:
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise StartError(owner, f"{path} was replaced while binding", "check who else writes that directory")
        os.chmod(f"/proc/self/fd/{fd}", SOCKET_MODE)
    finally:
        os.close(fd)


class GrpcServer:
    """A started gRPC server on the configured endpoint; ``port`` is the bound TCP port."""

    def __init__(self, owner: str, cfg: HubbleConfig, servicers: Sequence[tuple[object, object]]) -> None:
        self.owner = owner
        self.kind, self.host, port = parse_endpoint(cfg.endpoint)
        self._pool = futures.ThreadPoolExecutor(max_workers=cfg.max_concurrent_rpcs,
                                                thread_name_prefix=f"flowtel-{owner}")
        self.server = grpc.server(self._pool, options=server_options(cfg),
                                  maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        for add, servicer in servicers:
            add(servicer, self.server)  # type: ignore[operator]  # the generated add_*Servicer_to_server functions
        creds = credentials(owner, cfg.tls) if cfg.tls is not None else None
        if self.kind == "unix":
            prepare_unix_socket(owner, self.host)
            address = f"unix:{self.host}"
        else:
            address = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        try:
            bound = (self.server.add_secure_port(address, creds) if creds is not None
                     else self.server.add_insecure_port(address))
        except RuntimeError as exc:
            bound, why = 0, str(exc)
        else:
            why = "address in use or not available"
        if not bound:
            self._pool.shutdown(wait=False)
            raise StartError(owner, f"cannot listen on {cfg.endpoint}: {why}",
                             f"set extensions.{owner}.endpoint to a free HOST:PORT or unix:///PATH, or stop "
                             f"what holds it (`ss -lxtnp` shows it; another flowtel agent on this node?)")
        if self.kind == "unix":
            restrict_unix_socket(owner, self.host)
        self.port = bound if self.kind == "tcp" else 0
        self.server.start()

    @property
    def endpoint(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.host}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        done: threading.Event = self.server.stop(grace)
        done.wait(grace + 3.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.kind == "unix":
            try:
                st = os.lstat(self.host)
                if stat.S_ISSOCK(st.st_mode):
                    os.unlink(self.host)
            except FileNotFoundError:
                pass
