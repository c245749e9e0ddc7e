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

from cachetools import TTLCache

from flowtel.records import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP

EPHEMERAL_LOW, EPHEMERAL_HIGH = 32768, 60999
_ECHO_REQUEST = {IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 128}
_ECHO_REPLY = {IPPROTO_ICMP: 0, IPPROTO_ICMPV6: 129}

Tuple = tuple[str, int, str, int]  # (src, sport, dst, dport) as the client sent it


class ReplyInference:
    def __init__(self, *, max_connections: int = 65536, ttl_s: float = 3600.0) -> None:
        # Client-side 5-tuples learned from handshakes; both directions look it up.
        self._clients: TTLCache[Tuple, bool] = TTLCache(maxsize=max_connections, ttl=ttl_s)

    def is_reply(
        self, protocol: int, src: str, sport: int, dst: str, dport: int, syn: int = 0, synack: int = 0
    ) -> bool | None:
        if protocol == IPPROTO_TCP:
            if synack:
                self._clients[(dst, dport, src, sport)] = True
                return True
            if syn:
                self._clients[(src, sport, dst, dport)] = True
                return False
            if (src, sport, dst, dport) in self._clients:
                return False
            if (dst, dport, src, sport) in self._clients:
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
