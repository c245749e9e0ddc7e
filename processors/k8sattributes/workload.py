"""A pod's workload: the controller chain up to the object people name.

ReplicaSet → Deployment and Job → CronJob take one more step. With the ReplicaSet (Job)
watch on, that step reads the owner from the watched object; with it off (for scale: a
large cluster has many old ReplicaSets) or before the object is seen, it follows Cilium
and Istio: a ReplicaSet named ``<deployment>-<pod-template-hash>`` belongs to that
Deployment, a Job named ``<cronjob>-<8 to 10 digits>`` (the schedule time in minutes) to
that CronJob. StatefulSet, DaemonSet and other controllers are the controller itself; a
bare pod has no workload, as in Hubble.

Results are cached per owner in a bounded, expiring cache: every replica of a workload
shares one entry, and an owner that changes is re-read within the TTL (or at once, when
its watch event invalidates it).
"""
from __future__ import annotations

import re
import threading
from typing import Callable, Mapping

from cachetools import TTLCache

from processors.k8sattributes.internal.kube.objects import JobMeta, OwnerRef, PodMeta, ReplicaSetMeta

CRONJOB_JOB_NAME = re.compile(r"^(.+)-\d{8,10}$")
POD_TEMPLATE_HASH = "pod-template-hash"

# OTel semantic-convention attribute of each controller kind.
KIND_ATTRIBUTES: dict[str, str] = {
    "Deployment": "k8s.deployment.name",
    "ReplicaSet": "k8s.replicaset.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "Job": "k8s.job.name",
    "CronJob": "k8s.cronjob.name",
}

Chain = tuple[tuple[str, str], ...]  # (kind, name), the top-level workload first


class OwnerResolver:
    def __init__(
        self,
        *,
        replicasets: Callable[[], Mapping[str, ReplicaSetMeta]] | None,
        jobs: Callable[[], Mapping[str, JobMeta]] | None,
        cache_size: int,
        cache_ttl: float,
    ) -> None:
        # Callables, not maps: an informer swaps its store on relist.
        self._replicasets = replicasets
        self._jobs = jobs
        self._cache: TTLCache[tuple[str, str, str], Chain] = TTLCache(maxsize=cache_size, ttl=cache_ttl)
        self._lock = threading.Lock()  # cachetools caches are not thread-safe
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            self._cache.expire()
            return len(self._cache)

    def chain(self, pod: PodMeta) -> Chain:
        owner = pod.owner
        if owner is None:
            return ()
        # Every pod of one ReplicaSet has the same pod-template-hash: the owner is the key.
        key = (pod.namespace, owner.kind, owner.name)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self.hits += 1
                return found
            self.misses += 1
        template_hash = (pod.label(POD_TEMPLATE_HASH) or "") if owner.kind == "ReplicaSet" else ""
        result = self._resolve(pod.namespace, owner, template_hash)
        with self._lock:
            self._cache[key] = result
        return result

    def invalidate(self, namespace: str, kind: str, name: str) -> None:
        with self._lock:
            self._cache.pop((namespace, kind, name), None)

    def _resolve(self, namespace: str, owner: OwnerRef, template_hash: str) -> Chain:
        if owner.kind == "ReplicaSet":
            rs = self._replicasets().get(f"{namespace}/{owner.name}") if self._replicasets else None
            if rs is not None:
                return (("Deployment", rs.deployment), ("ReplicaSet", owner.name)) if rs.deployment else (("ReplicaSet", owner.name),)
            if template_hash and owner.name.endswith("-" + template_hash):
                return ("Deployment", owner.name[: -len(template_hash) - 1]), ("ReplicaSet", owner.name)
            return (("ReplicaSet", owner.name),)
        if owner.kind == "Job":
            job = self._jobs().get(f"{namespace}/{owner.name}") if self._jobs else None
            if job is not None:
                return (("CronJob", job.cronjob), ("Job", owner.name)) if job.cronjob else (("Job", owner.name),)
            m = CRONJOB_JOB_NAME.match(owner.name)
            if m:
                return ("CronJob", m.group(1)), ("Job", owner.name)
            return (("Job", owner.name),)
        return ((owner.kind, owner.name),)
