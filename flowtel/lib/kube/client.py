"""The official client, configured from a component's credential settings.

One implementation for every user (the k8sattributes processor, the DNS proxy, `flowtel
doctor`), so a credential problem reads the same wherever it shows up, with the remedy in
the settings of the component that has it (:class:`flowtel.preflight.KubernetesAccess`).

Credentials that cannot work (no kubeconfig, not in a pod) stop a component with a remedy:
retrying would never help. An API server that does not answer does not: that is the
informers' business, and the component runs meanwhile.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Callable, Mapping

from kubernetes import client, config
from kubernetes.config.incluster_config import InClusterConfigLoader

from flowtel.errors import StartError
from flowtel.preflight import KubernetesAccess

# Where Kubernetes mounts a pod's service account; tests point it at their own files.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class AccessError(Exception):
    """Credentials that cannot work: what is wrong and how to fix it."""

    def __init__(self, problem: str, remedy: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.remedy = remedy


@dataclass(frozen=True, slots=True)
class Loaded:
    configuration: client.Configuration
    where: str  # "API server https://… (service account system:serviceaccount:ns:name)"
    subject: str | None  # the service account, when known (for the RBAC remedy)


def service_account_subject(token: str) -> str | None:
    """system:serviceaccount:NS:NAME from the token's claims (not verified: only for messages)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        sub = claims.get("sub") if isinstance(claims, dict) else None
        return sub if isinstance(sub, str) else None
    except (IndexError, ValueError):
        return None


def load(access: KubernetesAccess, *, resolve: Callable[[str], str] | None = None,
         environ: Mapping[str, str] | None = None) -> Loaded:
    """The client configuration ``access`` describes; raises :class:`AccessError`.

    ``resolve`` maps the service account directory to where it is read (the doctor reads a
    node tree under another root); messages name the path as the pod sees it."""
    env = os.environ if environ is None else environ
    cfg = client.Configuration()
    if access.auth_type == "serviceAccount":
        shown = SERVICE_ACCOUNT_DIR
        sa = resolve(shown) if resolve is not None else shown
        if not env.get("KUBERNETES_SERVICE_HOST") or not env.get("KUBERNETES_SERVICE_PORT"):
            raise AccessError(
                "auth_type serviceAccount, but KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are unset: "
                "this is not running in a pod",
                f"run {access.in_cluster}, or outside a cluster {access.use_kubeconfig}",
            )
        token_path = os.path.join(sa, "token")
        if not os.path.isfile(token_path):
            raise AccessError(
                f"auth_type serviceAccount, but the token {os.path.join(shown, 'token')} does not exist",
                "the pod got no service account token: drop `automountServiceAccountToken: false` from "
                f"{access.in_cluster} and its ServiceAccount",
            )
        try:
            with open(token_path) as f:
                subject = service_account_subject(f.read().strip())
            InClusterConfigLoader(token_filename=token_path,
                                  cert_filename=os.path.join(sa, "ca.crt")).load_and_set(cfg)
        except (OSError, config.ConfigException) as exc:
            raise AccessError(
                f"auth_type serviceAccount, but the in-cluster configuration is unusable: {exc}",
                f"the pod's service account mount ({shown}: token and ca.crt) is incomplete: check the "
                "volumes and automountServiceAccountToken of " + access.in_cluster,
            ) from None
        return Loaded(cfg, f"API server {cfg.host} (service account {subject or 'unknown'})", subject)
    if access.auth_type == "kubeConfig":
        if access.kubeconfig:
            spec, origin = access.kubeconfig, "kubeconfig"
        elif env.get("KUBECONFIG"):
            spec, origin = env["KUBECONFIG"], "$KUBECONFIG"
        else:
            spec, origin = "~/.kube/config", "default location"
        paths = [os.path.expanduser(p) for p in spec.split(os.pathsep) if p]
        if not any(os.path.isfile(p) for p in paths):
            raise AccessError(
                f"auth_type kubeConfig, but the kubeconfig {', '.join(paths)} ({origin}) does not exist",
                f"point {access.kubeconfig_setting} (or $KUBECONFIG) at a kubeconfig (`kubectl config view "
                f"--raw > FILE` writes one); or run {access.in_cluster}",
            )
        try:
            config.load_kube_config(config_file=os.pathsep.join(paths), context=access.context,
                                    client_configuration=cfg, persist_config=False)
        except Exception as exc:  # ConfigException, YAML errors: all mean "this file is unusable"
            raise AccessError(
                f"the kubeconfig {', '.join(paths)} is unusable: {type(exc).__name__}: {exc}",
                f"check it with `kubectl --kubeconfig {paths[0]} config view`; it needs a current-context "
                "(or `context:`) with a cluster server and credentials",
            ) from None
        return Loaded(cfg, f"API server {cfg.host} (kubeconfig {', '.join(paths)})", None)
    raise AccessError(f"unknown auth_type {access.auth_type!r}", "set auth_type to serviceAccount or kubeConfig")


def connect(access: KubernetesAccess, *, pool_size: int) -> client.ApiClient:
    """An API client for ``access``; raises StartError with the remedy when it cannot work."""
    try:
        loaded = load(access)
    except AccessError as exc:
        raise StartError(access.component, exc.problem, exc.remedy) from None
    cfg = loaded.configuration
    cfg.retries = False  # the informers back off and retry themselves, and count it
    cfg.connection_pool_maxsize = pool_size
    return client.ApiClient(cfg)


def server_of(api: client.ApiClient) -> str:
    return str(api.configuration.host)
