"""The Kubernetes access the peer watcher borrows from the k8sattributes processor's
client (the project's one implementation of list-and-watch); imported only here so that
its move to a shared library changes these lines alone."""
from __future__ import annotations

from processors.k8sattributes.internal.kube.client import connect, listers, server_of
from processors.k8sattributes.internal.kube.health import ApiHealth
from processors.k8sattributes.internal.kube.informer import Informer, WatchOptions

__all__ = ["ApiHealth", "Informer", "WatchOptions", "connect", "listers", "server_of"]
