"""One voice for every informer of a metadata source about the API server's health.

Seven informers failing at once must not print seven stack traces a second: the first
failure is one clear ERROR line (what failed, why, what still works, how to fix it), later
ones a WARNING at most once a minute, and the recovery one INFO line.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from kubernetes.client import ApiException

from flowtel.doctor import describe_transport_error

log = logging.getLogger("flowtel.processor.k8sattributes")

RBAC_REMEDY = (
    "grant the agent's ServiceAccount get/list/watch on pods, services, nodes, namespaces, "
    "replicasets (apps), jobs (batch) and endpointslices (discovery.k8s.io); check with "
    "`kubectl auth can-i watch pods --all-namespaces --as=system:serviceaccount:NS:NAME`"
)
REPEAT_INTERVAL_S = 60.0


def describe(exc: BaseException, rbac_remedy: str = RBAC_REMEDY) -> tuple[str, str]:
    """(what went wrong, how to fix it) for an error from the API server or the network."""
    if isinstance(exc, ApiException):
        status = exc.status
        reason = str(exc.reason or "").strip()
        if status == 401:
            return (f"401 Unauthorized ({reason})",
                    "the credentials were rejected: refresh the kubeconfig's credentials, or restart the pod for a fresh service account token")
        if status == 403:
            return f"403 Forbidden ({reason})", rbac_remedy
        if status == 404:
            return (f"404 Not Found ({reason})",
                    "the API server does not serve this resource: for a custom resource (e.g. cilium.io "
                    "policies) install its CustomResourceDefinition; `kubectl api-resources` lists what is served")
        if status:
            return f"HTTP {status} ({reason})", "see the API server's message and logs"
        return reason or "request failed", "check the API server address and that it is up"
    return (describe_transport_error(exc),
            "check that the API server is up and reachable from this node (`kubectl get --raw /version` with the same credentials)")


# What the k8sattributes processor does while the API server fails; other users of the
# informers (the DNS proxy) say what they do instead.
MEANWHILE = "Records keep flowing with what is already known (addresses not yet known are reserved:world)"


class ApiHealth:
    def __init__(self, component: str, server: str, on_change: Callable[[str | None], None] | None = None, *,
                 meanwhile: str = MEANWHILE, rbac_remedy: str = RBAC_REMEDY,
                 logger: logging.Logger | None = None) -> None:
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
