"""One voice for every informer of a metadata source about the API server's health.

Seven informers failing at once must not print seven stack traces a second: the first
failure is one clear ERROR line (what failed, why, what still works, how to fix it), later
ones a WARNING at most once a minute, and the recovery one INFO line.
"""
from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from typing import Callable, Iterator

from kubernetes.client import ApiException

from flowtel.preflight import KubernetesAccess

log = logging.getLogger("flowtel.kube")

REPEAT_INTERVAL_S = 60.0
DEFAULT_TIMEOUT_S = 5.0


def rbac_remedy(access: KubernetesAccess, subject: str | None = None) -> str:
    """What to grant, to whom, from which manifest, and how to check it."""
    groups: dict[str, list[str]] = {}
    for group, plural in access.resources:
        groups.setdefault(group, []).append(plural)
    what = "; ".join(f"{', '.join(plurals)}{f' ({group})' if group else ''}" for group, plurals in groups.items())
    first_group, first = access.resources[0] if access.resources else ("", "pods")
    resource = f"{first}.{first_group}" if first_group else first
    who = subject or f"the {access.component} ServiceAccount (or the kubeconfig's user)"
    as_flag = f" --as={subject}" if subject else " --as=system:serviceaccount:NS:NAME"
    return (f"grant {who} get/list/watch on {what} (the ClusterRole and ClusterRoleBinding in "
            f"{access.rbac_manifest}); check with `kubectl auth can-i list {resource} --all-namespaces{as_flag}`")


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        # urllib3 keeps the socket error in .reason, not always in __cause__.
        for nxt in (getattr(e, "reason", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def describe_transport_error(exc: BaseException, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """The network failure under a client exception, in a few words."""
    chain = list(_exception_chain(exc))
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {e.verify_message}"
        if isinstance(e, ssl.SSLError):
            return f"TLS error: {e}"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the server's host name: {e.strerror}"
        if isinstance(e, ConnectionResetError):
            return "connection reset by the server"
    if "Connection refused" in str(exc):
        return "connection refused"
    for e in chain:
        if isinstance(e, TimeoutError) or "timed out" in str(e).lower():
            return f"no answer within {timeout:g} s"
    return f"{type(exc).__name__}: {exc}"


def _api_message(exc: ApiException) -> str:
    body = exc.body
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.reason or "").strip() or "no message"


def describe(exc: BaseException, rbac: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[str, str]:
    """(what went wrong, how to fix it) for an error from the API server or the network;
    ``rbac`` is the remedy for 403 (:func:`rbac_remedy` of the component's access)."""
    if isinstance(exc, ApiException):
        status = exc.status
        message = _api_message(exc)
        if status == 401:
            return (f"401 Unauthorized ({message})",
                    "the credentials were rejected: refresh the kubeconfig's credentials (`kubectl get --raw "
                    "/version` with the same kubeconfig must work), or restart the pod for a fresh service "
                    "account token and check that its ServiceAccount exists")
        if status == 403:
            return f"403 Forbidden ({message})", rbac
        if status == 404:
            return (f"404 Not Found ({message})",
                    "the API server does not serve this resource: for a custom resource (e.g. cilium.io "
                    "policies) install its CustomResourceDefinition; `kubectl api-resources` lists what is served")
        if status:
            return f"HTTP {status} ({message})", "see the API server's message and logs"
        return message or "request failed", "check the API server address and that it is up"
    return (describe_transport_error(exc, timeout),
            "check that the API server is up and reachable from this node (`kubectl get --raw /version` with "
            "the same credentials); from a pod: NetworkPolicies and firewalls between the node and the API server")


class ApiHealth:
    """``meanwhile`` says what the component does while the API server fails; ``rbac_remedy``
    what to grant it (:func:`rbac_remedy`)."""

    def __init__(self, component: str, server: str, on_change: Callable[[str | None], None] | None = None, *,
                 meanwhile: str, rbac_remedy: str, logger: logging.Logger | None = None) -> None:
        self.component = component
        self._log = logger or log  # the user's logger, so its lines sort under its name
        self.server = server
        self.meanwhile = meanwhile
        self.rbac_remedy = rbac_remedy
        # Told the error when the API server starts failing, None when it answers again
        # (the processor reports it as its component status).
        self._on_change = on_change
        self._lock = threading.Lock()
        self._failing: set[str] = set()
        self._failures = 0
        self._last_log = 0.0
        self.last_error = ""

    @property
    def logger(self) -> logging.Logger:
        """The component's logger: informer lines sort under the component's name."""
        return self._log

    @property
    def healthy(self) -> bool:
        with self._lock:
            return not self._failing

    def failed(self, informer: str, exc: BaseException) -> None:
        what, remedy = describe(exc, self.rbac_remedy)
        now = time.monotonic()
        with self._lock:
            first = not self._failing
            self._failing.add(informer)
            self._failures += 1
            self.last_error = what
            if first:
                self._last_log = now
                self._failures = 1
                level = logging.ERROR
            elif now - self._last_log >= REPEAT_INTERVAL_S:
                self._last_log = now
                level = logging.WARNING
            else:
                return
            failures = self._failures
        if level == logging.ERROR:
            if self._on_change is not None:
                self._on_change(f"the Kubernetes API server at {self.server} is failing: {what}")
            self._log.error(
                "%s: cannot list/watch %s from the Kubernetes API server at %s: %s. %s; retrying with "
                "backoff. fix: %s", self.component, informer, self.server, what, self.meanwhile, remedy)
        else:
            self._log.warning("%s: the Kubernetes API server at %s is still failing (%d errors; last: %s)",
                        self.component, self.server, failures, what)

    def succeeded(self, informer: str) -> None:
        with self._lock:
            if informer not in self._failing:
                return
            self._failing.discard(informer)
            recovered = not self._failing
        if recovered:
            if self._on_change is not None:
                self._on_change(None)
            self._log.info("%s: the Kubernetes API server at %s answers again; caches are catching up", self.component, self.server)
