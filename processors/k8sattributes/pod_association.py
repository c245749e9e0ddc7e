"""Which pod held an IP address when a record was made.

Addresses are reused: a deleted pod's IP goes to a new pod, sometimes within a second,
while records counted before the deletion are still on their way (flows are drained on an
interval, then queued). So an address maps to a short history of *claims* — (pod UID,
from, until) — newest first, and a lookup picks the claim that covers the record's own
time:

- a claim starts at the pod's creation, or when the previous holder's claim ended if that
  is later: the new pod cannot have used the address before it was free (when a pod is
  seen with an address whose holder is not yet seen deleted, the switch happens then);
- a claim ends when the pod is deleted, turns Succeeded/Failed (its IP is released then),
  or a newer pod takes the address; records up to ``grace`` seconds after that end still
  resolve to it, so late records are named, and no later;
- a newer pod wins wherever claims overlap, and a record from before the current holder
  existed resolves to the earlier holder if its grace covers it, to nobody otherwise
  (allowing :data:`CLOCK_SKEW_S` of clock difference when no earlier holder is known).

Ended claims are dropped ``grace`` seconds after they end, and a deleted pod with them:
the index is bounded by the live pods plus what was deleted in the last ``grace`` seconds.

Writers (informer threads, the janitor) hold a lock; ``lookup`` runs on the pipeline
thread without one: it reads claim tuples that writers replace whole, and a claim's end,
which is one attribute written once.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from processors.k8sattributes.internal.kube.objects import PodMeta

# How far a record's time may precede the creation of the only pod known at its address.
CLOCK_SKEW_S = 2.0


@dataclass(slots=True)
class IpClaim:
    uid: str
    start: float
    end: float | None = None  # None while the pod holds the address


class PodAssociation:
    def __init__(self, grace: float, on_forget: Callable[[str], None] | None = None) -> None:
        self.grace = grace
        self._on_forget = on_forget  # told the UID of each pod that leaves the index
        self._lock = threading.Lock()
        self.pods: dict[str, PodMeta] = {}  # by UID: live pods and those still in their grace
        self.by_ip: dict[str, tuple[IpClaim, ...]] = {}
        self._gone: set[str] = set()  # UIDs deleted (or terminal) but still resolvable
        self._ended: deque[tuple[float, str, str]] = deque()  # (end, ip, uid), in end order

    # --- reads (pipeline thread, no lock) -------------------------------------------------

    def lookup(self, ip: str, when: float) -> PodMeta | None:
        claims = self.by_ip.get(ip)
        if not claims:
            return None
        last = len(claims) - 1
        if last == 0:  # the common case: one pod ever seen at this address
            c = claims[0]
            if when >= c.start - CLOCK_SKEW_S and (c.end is None or when <= c.end + self.grace):
                return self.pods.get(c.uid)
            return None
        for i, c in enumerate(claims):
            # The oldest claim known also takes records from a little before its start: the
            # API server's clock and this node's differ, and nobody else known could have them.
            start = c.start - CLOCK_SKEW_S if i == last else c.start
            if when >= start and (c.end is None or when <= c.end + self.grace):
                pod = self.pods.get(c.uid)
                if pod is not None:
                    return pod
        return None

    def span(self, ip: str, when: float) -> tuple[PodMeta | None, float, float]:
        """:meth:`lookup`, and the times ``[lo, hi]`` over which its answer for ``ip`` is the
        same with the index as it is now (a caller may reuse it for records of that span):
        always for an address no pod ever claimed, the claim's own window for the one pod
        that claimed it; only ``when`` itself where several claims or none covers it."""
        claims = self.by_ip.get(ip)
        if not claims:
            return None, -math.inf, math.inf
        if len(claims) == 1:
            c = claims[0]
            lo, hi = c.start - CLOCK_SKEW_S, math.inf if c.end is None else c.end + self.grace
            if lo <= when <= hi:
                pod = self.pods.get(c.uid)
                if pod is not None:
                    return pod, lo, hi
        return self.lookup(ip, when), when, when

    @property
    def deleted_count(self) -> int:
        return len(self._gone)

    # --- writes (informer threads) --------------------------------------------------------

    def upsert(self, pod: PodMeta, now: float) -> None:
        with self._lock:
            old = self.pods.get(pod.uid)
            if pod.uid in self._gone:
                # Already ended (terminal); a later update does not bring the address back.
                self.pods[pod.uid] = pod
                return
            self.pods[pod.uid] = pod
            if pod.terminal:
                self._end_pod(pod.uid, set(pod.ips) | set(old.ips if old else ()), now)
                self._gone.add(pod.uid)
                self._forget_if_unclaimed(pod.uid, pod)
                return
            old_ips = old.ips if old is not None else ()
            for ip in old_ips:
                if ip not in pod.ips:
                    self._end_claim(ip, pod.uid, now)
            for ip in pod.ips:
                if ip not in old_ips or not self._holds(ip, pod.uid):
                    self._claim(ip, pod, now)

    def remove(self, pod: PodMeta, now: float) -> None:
        """The pod was deleted: its claims end now, and it resolves for ``grace`` more seconds."""
        with self._lock:
            known = self.pods.get(pod.uid, pod)
            if pod.uid not in self._gone:
                self._end_pod(pod.uid, set(known.ips) | set(pod.ips), now)
                self._gone.add(pod.uid)
            self.pods.setdefault(pod.uid, known)
            self._forget_if_unclaimed(pod.uid, known)

    def expire(self, now: float) -> int:
        """Drop claims whose grace is over, and pods left with none. Returns how many pods left."""
        forgotten = 0
        with self._lock:
            while self._ended and self._ended[0][0] + self.grace <= now:
                _, ip, uid = self._ended.popleft()
                claims = self.by_ip.get(ip, ())
                kept = tuple(c for c in claims if not (c.uid == uid and c.end is not None and c.end + self.grace <= now))
                if len(kept) != len(claims):
                    if kept:
                        self.by_ip[ip] = kept
                    else:
                        del self.by_ip[ip]
                pod = self.pods.get(uid)
                if uid in self._gone and pod is not None and self._forget_if_unclaimed(uid, pod):
                    forgotten += 1
        return forgotten

    # --- internals (lock held) ------------------------------------------------------------

    def _holds(self, ip: str, uid: str) -> bool:
        return any(c.uid == uid and c.end is None for c in self.by_ip.get(ip, ()))

    def _claim(self, ip: str, pod: PodMeta, now: float) -> None:
        claims = self.by_ip.get(ip, ())
        start = pod.created
        for c in claims:
            if c.end is not None:
                start = max(start, c.end)
        newer_holder = None
        for c in claims:
            if c.end is None and c.uid != pod.uid:
                holder = self.pods.get(c.uid)
                if holder is not None and holder.created > pod.created:
                    newer_holder = c
                else:
                    # A newer pod took the address before the older one's deletion was
                    # seen. When it was released is unknown; records up to now stay with
                    # the pod that held it as far as anyone here knew (the new pod may
                    # have been Pending for minutes, so its creation says nothing).
                    c.end = now
                    self._ended.append((now, ip, c.uid))
                    start = max(start, now)
        claim = IpClaim(pod.uid, start)
        if newer_holder is not None:
            # Seen out of order (a relist): the older pod held the address before the newer one.
            claim.end = max(start, newer_holder.start)
            self._ended.append((now, ip, pod.uid))
        others = tuple(c for c in claims if c.uid != pod.uid)
        self.by_ip[ip] = tuple(sorted((claim, *others), key=lambda c: c.start, reverse=True))

    def _end_claim(self, ip: str, uid: str, now: float) -> None:
        for c in self.by_ip.get(ip, ()):
            if c.uid == uid and c.end is None:
                c.end = now
                self._ended.append((now, ip, uid))

    def _end_pod(self, uid: str, ips: set[str], now: float) -> None:
        for ip in ips:
            self._end_claim(ip, uid, now)

    def _forget_if_unclaimed(self, uid: str, pod: PodMeta) -> bool:
        if any(c.uid == uid for ip in pod.ips for c in self.by_ip.get(ip, ())):
            return False
        self.pods.pop(uid, None)
        self._gone.discard(uid)
        if self._on_forget is not None:
            self._on_forget(uid)
        return True
