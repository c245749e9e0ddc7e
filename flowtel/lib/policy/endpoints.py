"""Every known pod by identity, and what each ``toEndpoints`` selector selects."""
from __future__ import annotations

import threading
from typing import Iterable

from flowtel.lib.policy.pods import Labels, Pod
from flowtel.lib.policy.selectors import Selector


class _Identity:
    """One label set and the addresses of the pods that have it."""

    __slots__ = ("labels", "addresses", "pods", "selected_by")

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.addresses: dict[str, int] = {}  # address -> pods of this identity holding it
        self.pods = 0
        self.selected_by: set[Selector] = set()


class EndpointIndex:
    """Every known pod (every node's) by identity, and what each ``toEndpoints`` selector selects.

    Cilium resolves ``toEndpoints`` against every identity of the cluster; so does this, but
    one pod at a time: a pod that appears, goes or changes labels or addresses touches its
    identity only, and is matched against the selectors in use only when its identity is new
    (replicas share one), never all pods against all selectors. A selector is matched against
    every identity once, when first asked for. :attr:`version` moves when an address a
    selector in use selects appears or goes, so the datapath loader knows when to recompute.
    Safe to update from informer threads while the proxy's loop reads.
    """

    def __init__(self, pods: Iterable[Pod] = ()) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, tuple[Labels, tuple[str, ...]]] = {}
        self._identities: dict[Labels, _Identity] = {}
        self._selections: dict[Selector, set[Labels]] = {}
        self._version = 0
        for pod in pods:
            self.upsert(pod.key, pod.identity(), pod.ips)

    @property
    def version(self) -> int:
        return self._version

    def __len__(self) -> int:
        return len(self._pods)

    def identities(self) -> int:
        return len(self._identities)

    def upsert(self, key: str, labels: Labels, ips: tuple[str, ...]) -> None:
        """Add or change the pod ``key`` (``labels``: its identity, see :meth:`Pod.identity`)."""
        with self._lock:
            old = self._pods.get(key)
            if old == (labels, ips):
                return
            self._pods[key] = (labels, ips)
            self._attach(labels, ips)  # before detaching: an unchanged address never blinks
            if old is not None:
                self._detach(*old)

    def remove(self, key: str) -> None:
        with self._lock:
            old = self._pods.pop(key, None)
            if old is not None:
                self._detach(*old)

    def addresses(self, selector: Selector) -> set[str]:
        """The addresses of every pod ``selector`` selects."""
        with self._lock:
            chosen = self._selections.get(selector)
            if chosen is None:
                chosen = {k for k, ident in self._identities.items() if selector.matches(ident.labels)}
                for k in chosen:
                    self._identities[k].selected_by.add(selector)
                self._selections[selector] = chosen
            out: set[str] = set()
            for k in chosen:
                out.update(self._identities[k].addresses)
            return out

    def all_addresses(self) -> set[str]:
        """Every known pod's address (the cluster's endpoints: Cilium's ``cluster`` entity)."""
        with self._lock:
            out: set[str] = set()
            for ident in self._identities.values():
                out.update(ident.addresses)
            return out

    def retain(self, selectors: set[Selector]) -> None:
        """Forget the selections of selectors no policy uses any more."""
        with self._lock:
            for sel in [s for s in self._selections if s not in selectors]:
                for k in self._selections.pop(sel):
                    self._identities[k].selected_by.discard(sel)

    def _attach(self, labels: Labels, ips: tuple[str, ...]) -> None:
        ident = self._identities.get(labels)
        if ident is None:
            ident = self._identities[labels] = _Identity(dict(labels))
            for sel, chosen in self._selections.items():
                if sel.matches(ident.labels):
                    chosen.add(labels)
                    ident.selected_by.add(sel)
        ident.pods += 1
        for ip in ips:
            held = ident.addresses.get(ip, 0)
            ident.addresses[ip] = held + 1
            if not held and ident.selected_by:
                self._version += 1

    def _detach(self, labels: Labels, ips: tuple[str, ...]) -> None:
        ident = self._identities[labels]
        for ip in ips:
            held = ident.addresses[ip] - 1
            if held:
                ident.addresses[ip] = held
            else:
                del ident.addresses[ip]
                if ident.selected_by:
                    self._version += 1
        ident.pods -= 1
        if not ident.pods:
            del self._identities[labels]
            for sel in ident.selected_by:
                self._selections[sel].discard(labels)
