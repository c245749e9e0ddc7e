"""Config of the ``hubble`` extension: Hubble's Observer and Peer gRPC services."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import Duration

DEFAULT_ENDPOINT = "127.0.0.1:4244"  # Hubble's port; loopback until TLS or a policy guards it
UNIX_SCHEME = "unix://"


def parse_endpoint(text: str) -> tuple[str, str, int]:
    """``("tcp", host, port)`` for ``HOST:PORT`` / ``[IPv6]:PORT``, ``("unix", path, 0)`` for
    ``unix:///absolute/path``; ValueError says what is wrong."""
    if text.startswith(UNIX_SCHEME):
        path = text[len(UNIX_SCHEME):]
        if not path.startswith("/") or "\0" in path or len(path.encode()) > 107:
            raise ValueError(f"expected unix:///ABSOLUTE/PATH (at most 107 bytes), got {text!r}")
        return "unix", path, 0
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:4244) or unix:///PATH, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:4244, got {text!r}")
    return "tcp", host, int(port)


class ServerTLSConfig(ComponentConfig):
    """TLS as Hubble's server has it: a certificate for ``*.<cluster>.hubble-grpc.cilium.io``,
    and with ``client_ca_file`` mutual TLS (Hubble Relay presents its client certificate)."""

    cert_file: str = Field(description="PEM server certificate")
    key_file: str = Field(description="PEM private key of cert_file")
    client_ca_file: str = Field(default="", description="PEM CA bundle; when set, clients must present a certificate it signed (mTLS)")


class PeersConfig(ComponentConfig):
    """Where ``peer.Peer/Notify`` finds the agents of the cluster: the flowtel DaemonSet's
    pods, from the Kubernetes API."""

    auth_type: Literal["serviceAccount", "kubeConfig"] = Field(default="serviceAccount", description="how to reach the API server")
    kubeconfig: str | None = Field(default=None, description="kubeConfig: path (default $KUBECONFIG, ~/.kube/config)")
    context: str | None = Field(default=None, description="kubeConfig: context (default the current one)")
    namespace: str = Field(default="", description="namespace of the agents' pods (default: this pod's, from POD_NAMESPACE or the service account)")
    label_selector: str = Field(default="app.kubernetes.io/name=flowtel", description="selects the agents' pods")
    port: int = Field(default=0, ge=0, le=65535, description="port the other agents listen on (0: the port this server listens on)")
    cluster_name: str = Field(default="default", description="Cilium cluster name, for peer names and TLS server names")
    request_timeout: Duration = Field(default=30.0, description="connect/read timeout of list calls")
    watch_timeout: Duration = Field(default=300.0, description="the API server ends each watch after this long")

    @field_validator("cluster_name")
    @classmethod
    def _cluster(cls, value: str) -> str:
        if not value or "/" in value:
            raise ValueError(f"expected a cluster name without '/', got {value!r}")
        return value


class HubbleConfig(ComponentConfig):
    endpoint: str = Field(default=DEFAULT_ENDPOINT, description="HOST:PORT or unix:///PATH the gRPC server listens on")
    tls: ServerTLSConfig | None = Field(default=None, description="TLS (and mTLS with client_ca_file); absent: plaintext")
    buffer_size: int = Field(default=4095, ge=1, le=1_000_000, description="flows kept in the ring (Hubble's default 4095)")
    follower_buffer_size: int = Field(default=1024, ge=1, le=1_000_000, description="flows queued per follow stream before its losses are reported")
    max_followers: int = Field(default=32, ge=1, le=4096, description="concurrent follow streams (more get RESOURCE_EXHAUSTED)")
    max_concurrent_rpcs: int = Field(default=64, ge=2, le=4096, description="RPCs served at once (more get RESOURCE_EXHAUSTED)")
    max_recv_message_size: int = Field(default=1 << 20, ge=1024, le=64 << 20, description="largest request, bytes")
    max_send_message_size: int = Field(default=16 << 20, ge=1024, le=256 << 20, description="largest response, bytes")
    keepalive_time: Duration = Field(default=60.0, description="ping an idle connection after this long")
    keepalive_timeout: Duration = Field(default=20.0, description="close a connection whose ping is not answered in this long")
    max_connection_idle: Duration = Field(default=300.0, description="close a connection with no RPC for this long")
    peers: PeersConfig | None = Field(default=None, description="Peer/Notify from the Kubernetes API; absent: this agent is its only peer")
    node_address: str = Field(default="", description="address other agents and Relay dial for this node (default: $NODE_IP / $POD_IP, then the listening host)")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parse_endpoint(value)
        return value

    @model_validator(mode="after")
    def _keepalive(self) -> "HubbleConfig":
        if self.keepalive_time <= 0 or self.keepalive_timeout <= 0 or self.max_connection_idle <= 0:
            raise ValueError("keepalive_time, keepalive_timeout and max_connection_idle must be more than 0")
        if self.max_followers >= self.max_concurrent_rpcs:
            raise ValueError(f"max_followers ({self.max_followers}) must be less than max_concurrent_rpcs "
                             f"({self.max_concurrent_rpcs}), or follow streams could starve every other RPC")
        return self
