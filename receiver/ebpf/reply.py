"""Which end of an aggregated flow started the connection: Hubble's ``is_reply``.

Hubble takes ``is_reply`` from Cilium's conntrack; flowtel has no conntrack, so it infers it
from what the tc program counted, in this order:

1. TCP: a flow that carried a SYN-ACK is the server's side (a reply); one that carried a
   bare SYN is the client's (a request). Each handshake is remembered (bounded, expiring),
   so the same connection's later intervals, without a handshake in them, are named too.
2. ICMP/ICMPv6 echo: a request is not a reply, an echo reply is.
3. Otherwise, ports: a flow from an ephemeral port (Linux's default 32768–60999) to a port
   outside that range is a request, the reverse is a reply.
4. Still unknown: ``None`` (Hubble omits ``is_reply`` then).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from flowtel.records import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP

EPHEMERAL_LOW, EPHEMERAL_HIGH = 32768, 60999
_ECHO_REQUEST = {IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 128}
_ECHO_REPLY = {IPPROTO_ICMP: 0, IPPROTO_ICMPV6: 129}

Tuple = tuple[str, int, str, int]  # (src, sport, dst, dport) as the client sent it


class ReplyInference:
    def __init__(self, *, max_connections: int = 65536, ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # Client-side 5-tuples learned from handshakes → when they expire; both directions
        # look it up. An OrderedDict in refresh order rather than cachetools' TTLCache: the
        # oldest entry is always first, so expiry and the size bound are O(1) C calls per
        # handshake (TTLCache's bookkeeping cost ≈ 5 µs per insert, most of the decode of a
        # flow, bench/throughput.py).
        self._clients: OrderedDict[Tuple, float] = OrderedDict()
        self._max = max_connections
        self._ttl = ttl_s
        self._clock = clock
        # No entry expires before this (the first entry's deadline when last looked at: the
        # first is the oldest, and a refresh only moves it later). A learn reads the first
        # entry only once that time has come, not on every handshake (most flows of a busy
        # node carry one).
        self._next_expiry = float("inf")

    def _learn(self, key: Tuple) -> None:
        clients = self._clients
        now = self._clock()
        clients[key] = now + self._ttl
        clients.move_to_end(key)
        if len(clients) > self._max:
            clients.popitem(last=False)
        if now < self._next_expiry:
            if len(clients) == 1:
                self._next_expiry = now + self._ttl
            return
        while clients:
            oldest = next(iter(clients.values()))
            if oldest > now:
                self._next_expiry = oldest
                return
            clients.popitem(last=False)
        self._next_expiry = float("inf")

    def _known(self, key: Tuple) -> bool:
        deadline = self._clients.get(key)
        if deadline is None:
            return False
        if deadline <= self._clock():
            del self._clients[key]
            return False
        return True

    def is_reply(
        self, protocol: int, src: str, sport: int, dst: str, dport: int, syn: int = 0, synack: int = 0
    ) -> bool | None:
        if protocol == IPPROTO_TCP:
            if synack:
                self._learn((dst, dport, src, sport))
                return True
            if syn:
                self._learn((src, sport, dst, dport))
                return False
            if self._clients:
                if self._known((src, sport, dst, dport)):
                    return False
                if self._known((dst, dport, src, sport)):
                    return True
        elif protocol in _ECHO_REQUEST:
            if sport == _ECHO_REQUEST[protocol]:  # sport carries the ICMP type
                return False
            if sport == _ECHO_REPLY[protocol]:
                return True
            return None
        src_eph = EPHEMERAL_LOW <= sport <= EPHEMERAL_HIGH
        dst_eph = EPHEMERAL_LOW <= dport <= EPHEMERAL_HIGH
        if src_eph and not dst_eph:
            return False
        if dst_eph and not src_eph:
            return True
        return None

    def __len__(self) -> int:
        return len(self._clients)
