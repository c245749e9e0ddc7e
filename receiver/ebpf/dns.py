"""DNS seen by the tc programs → Hubble-shaped L7 flows and exact counts.

Pure logic: :class:`DnsTracker` takes decoded kernel events (:class:`DnsEvent`) and what
the DNS maps held (:mod:`receiver.ebpf.dnsmaps`) and returns records; reading the kernel is
:mod:`receiver.ebpf.dnsring`'s job.

UDP (the kernel counts, bpf/dns.h): every message is counted in the kernel per aggregation
key (interface, hook, addresses, server port, name hash, qtype, rcode, QR) and matched to its
request there; user space sees a budgeted *sample* of messages (``kind`` MESSAGE). A sampled
message becomes its own ``REQUEST``/``RESPONSE`` flow (latency from the kernel). When the
interval's buffer is drained, each key's messages that were not sampled become one
aggregated flow per key, with ``extensions.aggregated: true`` and ``extensions.count``: so
every message is in exactly one flow, and counts from flows equal the kernel's at any rate.
Requests that timed out in the kernel's pending map come back from its sweep as unanswered.

TCP (RFC 7766 framing, ``kind`` SEGMENT: user space counts): a segment is read from its start,
and every message whose length prefix starts in it is parsed. A message that runs past its
segment is parsed from what its first segment holds (header and question at least, answers
while whole) and counted as truncated; the segments that carry the rest are recognised by
their sequence numbers and skipped, and a message that starts after them is found again.
TCP exchanges are matched here (:mod:`receiver.ebpf.dnsmatch`).
"""
from __future__ import annotations

import dataclasses
import functools
import socket
from dataclasses import dataclass
from typing import Callable, TypeVar

from flowtel.histogram import DNS_LATENCY_BOUNDS, Histogram
from flowtel.records import (
    EXTENSION_AGGREGATED,
    EXTENSION_COUNT,
    IPPROTO_TCP,
    IPPROTO_UDP,
    DnsInfo,
    Flow,
    FlowType,
    MetricKind,
    MetricPoint,
    Verdict,
)
from flowtel.lib.bpf.constants import HEADER
from flowtel.lib.bpf.tcattach import Interface
from receiver.ebpf.dnstypes import Aggregate, AggKey, Expired, KernelLatency
from receiver.ebpf.dnsmatch import AddResult, Pending, PendingTable
from receiver.ebpf.direction import traffic_direction
from receiver.ebpf.dnswire import DnsMessage, MalformedMessage, parse_message, split_tcp, type_text

_SEQ_MOD = 1 << 32
_SEQ_HALF = 1 << 31
# TCP messages that run past their segment; more at once than this is not DNS traffic.
MAX_TCP_CONTINUATIONS = 16384

METRIC_REQUESTS = "networkobservability_dns_request_count"
METRIC_RESPONSES = "networkobservability_dns_response_count"
METRIC_UNANSWERED = "flowtel_dns_unanswered_total"
METRIC_PARSE_ERRORS = "flowtel_dns_parse_errors_total"
METRIC_LATENCY = "flowtel_dns_latency_seconds"
EXTENSION_UNANSWERED = "dns_unanswered"
EXTENSION_QUERY_HASH = "query_hash"
# bpf/flowtel.h: dns_event_hdr.kind and .status
KIND_SEGMENT = HEADER.DNS_EV_SEGMENT
KIND_MESSAGE = HEADER.DNS_EV_MESSAGE
STATUS_OK = HEADER.DNS_OK
# Unanswered requests of one interval reported one flow each, at most; beyond it, one
# aggregated flow per (interface, client, server, name, qtype).
MAX_UNANSWERED_FLOWS = 1024
# Names (by their kernel hash) and the last answer of each key, remembered for aggregated
# flows: bounded (a few MB at most), oldest forgotten first. A forgotten name is learned
# again from its next sample; until then its aggregate carries the hash.
MAX_NAMES = 16384
MAX_ANSWERS = 4096


@dataclass(slots=True)
class DnsEvent:
    """One DNS packet as the kernel reported it (``struct dns_event_hdr`` and its payload)."""

    ts_ns: int  # CLOCK_MONOTONIC
    ifindex: int
    hook: int
    family: int
    protocol: int
    saddr: bytes  # 16 bytes, IPv4 in the first 4
    daddr: bytes
    sport: int
    dport: int
    tcp_seq: int
    orig_len: int  # DNS payload bytes in the packet
    payload: bytes = b""  # the captured prefix of them
    # What the kernel decided about a UDP message (kind MESSAGE); all 0 for a TCP segment.
    kind: int = KIND_SEGMENT
    latency_ns: int = 0  # a response the kernel matched: its request's age
    name_hash: int = 0
    qtype: int = 0
    server_port: int = 0
    slot: int = 0
    status: int = STATUS_OK
    is_response: int = 0
    rcode: int = 0

    def agg_key(self) -> AggKey:
        """The kernel's aggregation key of this message (struct dns_agg_key)."""
        return AggKey(self.saddr, self.daddr, self.name_hash, self.ifindex, self.qtype, self.server_port, self.family,
                      self.hook, self.is_response, self.rcode, self.status)


@dataclass(slots=True)
class DnsCounts:
    """Cumulative counters since the tracker was created."""

    events: int = 0  # records received from the kernel (samples and TCP segments)
    requests: int = 0  # DNS requests (one per query per observation point), sampled or not
    responses: int = 0
    unanswered: int = 0
    parse_errors: int = 0  # packets with no readable DNS message (at most one per packet)
    aggregated: int = 0  # messages reported in aggregated flows (not sampled)
    reclassified: int = 0  # sampled messages the kernel counted that dnspython rejects
    truncated: int = 0  # messages read from an incomplete capture
    unmatched_responses: int = 0  # no pending request: late, or asked before we looked
    retransmits: int = 0  # requests whose exchange was pending already
    pending_full: int = 0  # requests not tracked: the pending table was full
    tcp_continuations: int = 0  # segments that only continue an earlier message


@dataclass(slots=True)
class _Query:
    """What a pending request needs to produce its unanswered flow later (kept small: the
    table holds up to max_pending of them)."""

    event: DnsEvent  # its payload already released
    query: str
    qtypes: list[str]


@functools.lru_cache(maxsize=65536)
def _ip(family: int, raw: bytes) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def dns_flow(node_name: str, *, family: int, saddr: bytes, daddr: bytes, protocol: int, sport: int, dport: int,
             ifindex: int, hook: int, iface: Interface | None, is_reply: bool, info: DnsInfo, time_ns: int,
             latency_ns: int, extensions: dict[str, object] | None = None) -> Flow:
    """The one place a DNS flow record is built (Hubble's L7 shape)."""
    return Flow(
        time_ns=time_ns,
        node_name=node_name,
        verdict=Verdict.FORWARDED,
        ip_version=family,
        src_ip=_ip(family, saddr),
        dst_ip=_ip(family, daddr),
        protocol=protocol,
        src_port=sport,
        dst_port=dport,
        flow_type=FlowType.L7,
        traffic_direction=traffic_direction(iface, hook),
        is_reply=is_reply,
        ethertype=0x86DD if family == 6 else 0x0800,
        ifindex=ifindex,
        ifname=iface.name if iface is not None else "",
        l7=info,
        l7_type="RESPONSE" if is_reply else "REQUEST",
        latency_ns=latency_ns,
        extensions=dict(extensions) if extensions else {},
    )


K = TypeVar("K")
V = TypeVar("V")


def _remember(table: dict[K, V], key: K, value: V, bound: int) -> None:
    """Insert into a bounded dict, forgetting the oldest entry when it is full."""
    table.pop(key, None)
    if len(table) >= bound:
        del table[next(iter(table))]
    table[key] = value


class DnsTracker:
    """Turns DNS events into flows, matches responses to requests, and counts everything.

    Not thread-safe: one thread feeds it (the ring buffer reader).
    """

    def __init__(
        self,
        *,
        node_name: str,
        timeout_ns: int,
        max_pending: int,
        interface_of: Callable[[int], Interface | None],
        wall_offset_ns: Callable[[], int],
    ) -> None:
        self.node_name = node_name
        self.counts = DnsCounts()
        self.pending: PendingTable[_Query] = PendingTable(timeout_ns, max_pending)
        self._interface_of = interface_of
        self._wall_offset_ns = wall_offset_ns
        # (ifindex, hook, saddr, sport, daddr, dport) -> (sequence number where the next
        # message starts, ts_ns of the segment that said so)
        self._tcp_next: dict[tuple[int, int, bytes, int, bytes, int], tuple[int, int]] = {}
        self.last_parse_error = ""
        # Latency of every TCP response matched to its request here (at the same observation
        # point); UDP exchanges are timed in the kernel's histogram.
        self.latency = Histogram(DNS_LATENCY_BOUNDS)
        # Per aggregation buffer (slot): samples seen of each kernel key, and how many of them
        # dnspython rejected although the kernel read their header and question.
        self._sampled: tuple[dict[AggKey, int], dict[AggKey, int]] = ({}, {})
        self._rejected: tuple[dict[AggKey, int], dict[AggKey, int]] = ({}, {})
        # name hash -> (query, qtypes) and key -> last answer, for aggregated flows.
        self._names: dict[int, tuple[str, list[str]]] = {}
        self._answers: dict[AggKey, DnsMessage] = {}
        # Pending-map keys of sampled requests dnspython rejected (not unanswered when they expire).
        self._rejected_requests: dict[tuple[bytes, bytes, int, int, int, int, int], None] = {}

    # -- events ---------------------------------------------------------------------------

    def process(self, events: list[DnsEvent]) -> list[Flow]:
        """Flows for a batch of events, in order. Malformed packets are counted, not raised.

        The events are consumed: their payloads are released once read, because pending
        requests keep their event.
        """
        out: list[Flow] = []
        offset = self._wall_offset_ns()
        ifaces: dict[int, Interface | None] = {}
        counts = self.counts
        for ev in events:
            counts.events += 1
            if ev.kind == KIND_MESSAGE:
                msg = self._sample(ev)
                messages = [msg] if msg is not None else []
            elif ev.protocol == IPPROTO_TCP:
                messages = self._tcp_messages(ev)
            else:
                messages = self._udp_messages(ev)
            ev.payload = b""
            if not messages:
                continue
            iface = ifaces.get(ev.ifindex)
            if iface is None and ev.ifindex not in ifaces:
                iface = ifaces[ev.ifindex] = self._interface_of(ev.ifindex)
            for msg in messages:
                if ev.kind == KIND_MESSAGE:
                    out.append(self._sampled_flow(ev, msg, iface, offset))
                else:
                    out.append(self._on_message(ev, msg, iface, offset))
        return out

    def _sample(self, ev: DnsEvent) -> DnsMessage | None:
        """A sampled UDP message the kernel has counted: parsed for its flow, never counted again."""
        key = ev.agg_key()
        sampled = self._sampled[ev.slot & 1]
        sampled[key] = sampled.get(key, 0) + 1
        complete = len(ev.payload) >= ev.orig_len
        wire = ev.payload[: ev.orig_len] if complete else ev.payload
        try:
            msg = parse_message(wire, complete)
        except MalformedMessage as exc:
            self.last_parse_error = str(exc)
            if ev.status == STATUS_OK and not complete:
                # The capture (capture_bytes) ended before what dnspython needs, though the
                # kernel read the question from its longer buffer: the message is fine, only
                # its sample is short. It is reported in its key's aggregate.
                sampled[key] -= 1
                return None
            if ev.status == STATUS_OK:
                # The kernel read its header and question; the records are bad. It counts as a
                # parse error, not as a message (reconcile() takes it out of the kernel's count).
                rejected = self._rejected[ev.slot & 1]
                rejected[key] = rejected.get(key, 0) + 1
                if not ev.is_response and len(wire) >= 2:
                    # Nor is it a request waiting for an answer: its pending entry is ignored.
                    pk = (ev.saddr, ev.daddr, ev.ifindex, ev.sport, ev.dport, (wire[0] << 8) | wire[1], ev.family)
                    _remember(self._rejected_requests, pk, None, MAX_NAMES)
            return None
        if ev.status != STATUS_OK:
            # The kernel's verdict stands (it counted a parse error); dnspython was lenient
            # where the kernel is strict (e.g. a compression pointer in the first question).
            return None
        if not complete:
            self.counts.truncated += 1
        if ev.name_hash and ev.name_hash not in self._names:
            _remember(self._names, ev.name_hash, (msg.query, msg.qtypes), MAX_NAMES)
        if msg.is_response:
            _remember(self._answers, key, msg, MAX_ANSWERS)
        return msg

    def _sampled_flow(self, ev: DnsEvent, msg: DnsMessage, iface: Interface | None, offset: int) -> Flow:
        info = DnsInfo(query=msg.query, qtypes=list(msg.qtypes), rcode=msg.rcode, ips=msg.ips, ttl=msg.ttl,
                       cnames=msg.cnames, rrtypes=msg.rrtypes) if msg.is_response else \
            DnsInfo(query=msg.query, qtypes=list(msg.qtypes))
        return dns_flow(self.node_name, family=ev.family, saddr=ev.saddr, daddr=ev.daddr, protocol=ev.protocol,
                        sport=ev.sport, dport=ev.dport, ifindex=ev.ifindex, hook=ev.hook, iface=iface,
                        is_reply=msg.is_response, info=info, time_ns=ev.ts_ns + offset, latency_ns=ev.latency_ns)

    # -- the kernel's aggregates ----------------------------------------------------------

    def reconcile(self, slot: int, aggregates: list[Aggregate]) -> list[Flow]:
        """Count one drained aggregation buffer and report what was not sampled.

        Call it once the buffer can no longer be written and every sample it produced has
        been processed. Each key's messages minus its samples become one aggregated flow.
        """
        sampled, rejected = self._sampled[slot & 1], self._rejected[slot & 1]
        counts = self.counts
        offset = self._wall_offset_ns()
        out: list[Flow] = []
        for agg in aggregates:
            key = agg.key
            if key.status != STATUS_OK:
                counts.parse_errors += agg.messages
                sampled.pop(key, None)
                continue
            bad = rejected.pop(key, 0)
            good = agg.messages - bad
            counts.parse_errors += bad
            counts.reclassified += bad
            if key.is_response:
                counts.responses += good
            else:
                counts.requests += good
            rest = agg.messages - sampled.pop(key, 0)
            if rest > 0:
                counts.aggregated += rest
                out.append(self._aggregated_flow(key, rest, agg.last_ns + offset))
        # Samples of messages the kernel had no room to key are in its node totals already.
        sampled.clear()
        rejected.clear()
        return out

    def count_unkeyed(self, requests: int, responses: int, malformed: int) -> None:
        """Messages the kernel counted in its node totals only (its aggregation map was full)."""
        self.counts.requests += requests
        self.counts.responses += responses
        self.counts.parse_errors += malformed

    def _name(self, name_hash: int) -> tuple[str, list[str]] | None:
        return self._names.get(name_hash) if name_hash else None

    def _aggregated_flow(self, key: AggKey, count: int, time_ns: int) -> Flow:
        named = self._name(key.name_hash)
        qtypes = [type_text(key.qtype)] if key.name_hash else []
        query = named[0] if named is not None else ""
        info = DnsInfo(query=query, qtypes=qtypes, rcode=key.rcode)
        last = self._answers.get(key) if key.is_response else None
        if last is not None:  # the answer last sampled for this name, qtype and rcode
            info = DnsInfo(query=query, qtypes=qtypes, rcode=last.rcode, ips=list(last.ips), ttl=last.ttl,
                           cnames=list(last.cnames), rrtypes=list(last.rrtypes))
        extensions: dict[str, object] = {EXTENSION_AGGREGATED: True, EXTENSION_COUNT: count}
        if named is None and key.name_hash:
            extensions[EXTENSION_QUERY_HASH] = f"{key.name_hash:016x}"
        # The server's port on its side; the clients' ports are many, so 0.
        sport, dport = (key.port, 0) if key.is_response else (0, key.port)
        return dns_flow(self.node_name, family=key.family, saddr=key.saddr, daddr=key.daddr,
                        protocol=IPPROTO_UDP, sport=sport, dport=dport, ifindex=key.ifindex, hook=key.hook,
                        iface=self._interface_of(key.ifindex), is_reply=bool(key.is_response), info=info,
                        time_ns=time_ns, latency_ns=0, extensions=extensions)

    def kernel_unanswered(self, expired: list[Expired]) -> list[Flow]:
        """Flows for UDP requests the kernel's pending map held past the timeout: one each
        (as its request, timed when the wait ran out), or aggregated beyond MAX_UNANSWERED_FLOWS."""
        if self._rejected_requests:
            rejected = self._rejected_requests
            kept = []
            for e in expired:
                k = (e.client, e.server, e.ifindex, e.client_port, e.server_port, e.id, e.family)
                if k in rejected:
                    del rejected[k]
                else:
                    kept.append(e)
            expired = kept
        if not expired:
            return []
        self.counts.unanswered += len(expired)
        offset = self._wall_offset_ns()
        timeout = self.pending.timeout_ns
        out: list[Flow] = []
        grouped: dict[tuple[int, int, bytes, bytes, int, int, int, int], list[Expired]] = {}
        for i, e in enumerate(expired):
            if i < MAX_UNANSWERED_FLOWS:
                out.append(self._unanswered_flow(e, e.client_port, e.ts_ns + timeout + offset, None))
            else:
                group = (e.ifindex, e.hook, e.client, e.server, e.server_port, e.family, e.name_hash, e.qtype)
                grouped.setdefault(group, []).append(e)
        for members in grouped.values():
            last = max(e.ts_ns for e in members)
            out.append(self._unanswered_flow(members[0], 0, last + timeout + offset, len(members)))
        return out

    def _unanswered_flow(self, e: Expired, client_port: int, time_ns: int, count: int | None) -> Flow:
        named = self._name(e.name_hash)
        info = DnsInfo(query=named[0] if named else "", qtypes=[type_text(e.qtype)] if e.name_hash else [])
        extensions: dict[str, object] = {EXTENSION_UNANSWERED: True}
        if count is not None:
            extensions.update({EXTENSION_AGGREGATED: True, EXTENSION_COUNT: count})
        if named is None and e.name_hash:
            extensions[EXTENSION_QUERY_HASH] = f"{e.name_hash:016x}"
        return dns_flow(self.node_name, family=e.family, saddr=e.client, daddr=e.server, protocol=IPPROTO_UDP,
                        sport=client_port, dport=e.server_port, ifindex=e.ifindex, hook=e.hook,
                        iface=self._interface_of(e.ifindex), is_reply=False, info=info, time_ns=time_ns,
                        latency_ns=0, extensions=extensions)

    def _parse_error(self, reason: str) -> None:
        self.counts.parse_errors += 1
        self.last_parse_error = reason

    def _udp_messages(self, ev: DnsEvent) -> list[DnsMessage]:
        complete = len(ev.payload) >= ev.orig_len
        wire = ev.payload[: ev.orig_len] if complete else ev.payload
        try:
            msg = parse_message(wire, complete)
        except MalformedMessage as exc:
            self._parse_error(str(exc))
            return []
        if not complete:
            self.counts.truncated += 1
        return [msg]

    def _tcp_messages(self, ev: DnsEvent) -> list[DnsMessage]:
        stream = (ev.ifindex, ev.hook, ev.saddr, ev.sport, ev.daddr, ev.dport)
        start = 0
        expected = self._tcp_next.pop(stream, None)
        if expected is not None:
            behind = (expected[0] - ev.tcp_seq) % _SEQ_MOD
            if 0 < behind < _SEQ_HALF:  # this segment starts inside the earlier message
                if behind >= ev.orig_len:
                    self._tcp_next[stream] = expected
                    self.counts.tcp_continuations += 1
                    return []
                start = behind
            # else: it starts at the next message, or after a gap we did not see: from 0
        split = split_tcp(ev.payload, ev.orig_len, start)
        messages: list[DnsMessage] = []
        error = split.error
        for body, whole in split.messages:
            try:
                messages.append(parse_message(body, whole))
            except MalformedMessage as exc:
                error = str(exc)
                break  # framing after a bad message cannot be trusted
            if not whole:
                self.counts.truncated += 1
        if error:
            self._parse_error(error)
        elif split.continues_at is not None:
            if len(self._tcp_next) >= MAX_TCP_CONTINUATIONS:
                del self._tcp_next[next(iter(self._tcp_next))]
            self._tcp_next[stream] = ((ev.tcp_seq + split.continues_at) % _SEQ_MOD, ev.ts_ns)
        return messages

    def _on_message(self, ev: DnsEvent, msg: DnsMessage, iface: Interface | None, offset: int) -> Flow:
        counts = self.counts
        if msg.is_response:
            key = (ev.ifindex, ev.daddr, ev.dport, ev.saddr, ev.sport, ev.protocol, msg.id)
            counts.responses += 1
            pending = self.pending.take(key, ev.ts_ns)
            latency = 0
            if pending is None:
                counts.unmatched_responses += 1
            else:
                latency = ev.ts_ns - pending.ts_ns
                self.latency.observe(latency / 1e9)
            info = DnsInfo(query=msg.query, qtypes=msg.qtypes, rcode=msg.rcode, ips=msg.ips, ttl=msg.ttl,
                           cnames=msg.cnames, rrtypes=msg.rrtypes)
            return self._flow(ev, True, info, iface, ev.ts_ns + offset, latency)
        key = (ev.ifindex, ev.saddr, ev.sport, ev.daddr, ev.dport, ev.protocol, msg.id)
        counts.requests += 1
        result = self.pending.add(key, ev.ts_ns, _Query(ev, msg.query, msg.qtypes))
        if result is AddResult.DUPLICATE:
            counts.retransmits += 1
        elif result is AddResult.FULL:
            counts.pending_full += 1
        info = DnsInfo(query=msg.query, qtypes=list(msg.qtypes))
        return self._flow(ev, False, info, iface, ev.ts_ns + offset, 0)

    def _flow(self, ev: DnsEvent, is_reply: bool, info: DnsInfo, iface: Interface | None, time_ns: int,
              latency_ns: int) -> Flow:
        return dns_flow(self.node_name, family=ev.family, saddr=ev.saddr, daddr=ev.daddr, protocol=ev.protocol,
                        sport=ev.sport, dport=ev.dport, ifindex=ev.ifindex, hook=ev.hook, iface=iface,
                        is_reply=is_reply, info=info, time_ns=time_ns, latency_ns=latency_ns)

    # -- time -----------------------------------------------------------------------------

    def expire(self, horizon_ns: int) -> list[Flow]:
        """Unanswered flows for requests with no response by ``horizon_ns`` (CLOCK_MONOTONIC).

        The caller passes a time by which every earlier packet has reached it. Each flow is
        its request's, timed when the wait ran out.
        """
        expired: list[Pending[_Query]] = self.pending.expire(horizon_ns)
        # Continuation state older than the timeout belongs to a stream that went quiet.
        # Entries are (re)inserted as segments arrive, so the oldest come first.
        stale = horizon_ns - self.pending.timeout_ns
        tcp_next = self._tcp_next
        while tcp_next:
            stream = next(iter(tcp_next))
            if tcp_next[stream][1] > stale:
                break
            del tcp_next[stream]
        if not expired:
            return []
        self.counts.unanswered += len(expired)
        offset = self._wall_offset_ns()
        timeout = self.pending.timeout_ns
        out: list[Flow] = []
        for p in expired:
            q = p.item
            info = DnsInfo(query=q.query, qtypes=list(q.qtypes))
            out.append(dns_flow(self.node_name, family=q.event.family, saddr=q.event.saddr, daddr=q.event.daddr,
                                protocol=q.event.protocol, sport=q.event.sport, dport=q.event.dport,
                                ifindex=q.event.ifindex, hook=q.event.hook,
                                iface=self._interface_of(q.event.ifindex), is_reply=False, info=info,
                                time_ns=p.ts_ns + timeout + offset, latency_ns=0,
                                extensions={EXTENSION_UNANSWERED: True}))
        return out

    def metric_points(self, now_ns: int, kernel_latency: KernelLatency | None = None) -> list[MetricPoint]:
        """Node-level cumulative counters and the latency histogram (no labels: per-pod detail
        is in the flows): UDP timed in the kernel plus TCP timed here."""
        c = self.counts
        latency = self.latency.point(METRIC_LATENCY, now_ns, unit="s",
                                     description="Latency of DNS responses matched to their request (kernel "
                                                 "timestamps, each observation point counts)")
        if kernel_latency is not None:
            n = len(latency.bucket_counts)
            latency = dataclasses.replace(
                latency,
                value=latency.value + kernel_latency.sum_ns / 1e9,
                count=latency.count + kernel_latency.count,
                bucket_counts=tuple(a + b for a, b in zip(latency.bucket_counts, kernel_latency.bucket_counts[:n])),
            )
        return [
            MetricPoint(METRIC_REQUESTS, float(c.requests), MetricKind.SUM, now_ns,
                        description="DNS requests observed (each observation point counts)"),
            MetricPoint(METRIC_RESPONSES, float(c.responses), MetricKind.SUM, now_ns,
                        description="DNS responses observed (each observation point counts)"),
            MetricPoint(METRIC_UNANSWERED, float(c.unanswered), MetricKind.SUM, now_ns,
                        description="DNS requests with no response within the timeout"),
            MetricPoint(METRIC_PARSE_ERRORS, float(c.parse_errors), MetricKind.SUM, now_ns,
                        description="DNS-port packets that held no readable DNS message"),
            latency,
        ]
