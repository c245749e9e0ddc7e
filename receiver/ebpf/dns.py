"""DNS seen by the tc programs → Hubble-shaped L7 flows and exact counts.

Pure logic: :class:`DnsTracker` takes decoded kernel samples (:class:`DnsEvent`) and what
the DNS maps held (:mod:`receiver.ebpf.dnsmaps`) and returns records; reading the kernel is
:mod:`receiver.ebpf.dnsring`'s job. Each DNS message becomes one flow (or, above the sample
budget, one aggregated flow per key and interval): a ``REQUEST`` per query, a ``RESPONSE``
per answer, each from the interface and hook where the kernel counted it: once, at the first
pod interface it crosses (bpf/dns.h; Retina's and Hubble's count). A query with no response
within the timeout yields one more flow of kind ``DNS_UNANSWERED`` (verdict ERROR, no
``l7.type`` on the wire).

The kernel counts every message, over UDP and TCP (bpf/dns.h), per aggregation key
(interface, hook, addresses, server port, name hash, qtype, rcode, QR, protocol) and matches
responses to requests there; user space sees samples of messages:

- ``MESSAGE``: within the kernel's per-CPU budget; it becomes its own ``REQUEST``/``RESPONSE``
  flow (latency from the kernel);
- ``NAME``: over the budget, the first message of its name, qtype, rcode and QR in the
  interval; it teaches the name and the answer and stays in its key's aggregate.

When the interval's buffer is drained, each key's messages that were not sampled as
``MESSAGE`` become one aggregated flow per key, with ``extensions.aggregated: true`` and
``extensions.count``: so every message is in exactly one flow, and counts from flows equal
the kernel's at any rate. Requests that timed out in the kernel's pending map come back from
its sweep as unanswered.
"""
from __future__ import annotations

import dataclasses
import functools
import socket
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

from flowtel.histogram import DNS_LATENCY_BOUNDS, Histogram
from flowtel.records import (
    EXTENSION_AGGREGATED,
    EXTENSION_COUNT,
    DnsInfo,
    Flow,
    FrozenDict,
    EventKind,
    MetricKind,
    MetricPoint,
    TrafficDirection,
    Verdict,
    frozen_extensions,
)
from flowtel.lib.bpf.constants import HEADER
from flowtel.lib.bpf.tcattach import Interface
from receiver.ebpf.dnstypes import Aggregate, AggKey, Expired, KernelLatency
from receiver.ebpf.dnswire import DnsMessage, MalformedMessage, parse_shared, question_name, type_text

METRIC_REQUESTS = "networkobservability_dns_request_count"
METRIC_RESPONSES = "networkobservability_dns_response_count"
METRIC_UNANSWERED = "flowtel_dns_unanswered_total"
METRIC_PARSE_ERRORS = "flowtel_dns_parse_errors_total"
METRIC_LATENCY = "flowtel_dns_latency_seconds"
EXTENSION_UNANSWERED = "dns_unanswered"
EXTENSION_QUERY_HASH = "query_hash"
# bpf/flowtel.h: dns_event_hdr.kind and .status
KIND_MESSAGE = HEADER.DNS_EV_MESSAGE
KIND_NAME = HEADER.DNS_EV_NAME
STATUS_OK = HEADER.DNS_OK
# Unanswered requests of one interval reported one flow each, at most; beyond it, one
# aggregated flow per (interface, client, server, name, qtype).
MAX_UNANSWERED_FLOWS = 1024
# Names (by their kernel hash) and the last answer of each name, qtype and rcode, remembered
# for aggregated flows: bounded (a few MB at most), oldest forgotten first. A forgotten name
# is learned again from its next name sample (one an interval); until then its aggregate
# carries the hash.
MAX_NAMES = 16384
MAX_ANSWERS = 4096
# Flow fields of each parsed message (shared by every message that differs only in its ID),
# kept for the per-message flows: at most this many, then forgotten all at once.
MAX_INFOS = 4096
# A query with one question and no records (what stub resolvers send without EDNS): QDCOUNT 1,
# AN/NS/ARCOUNT 0; opcode QUERY (the opcode's 4 bits in the third header byte).
_ONE_QUESTION_ONLY = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_OPCODE_MASK = 0x78
DNS_BARE_QUERY_LEN = 12 + 1 + 4  # header, the root name, qtype and qclass


@dataclass(slots=True)
class DnsEvent:
    """One DNS message as the kernel sampled it (``struct dns_event_hdr`` and its payload)."""

    ts_ns: int  # CLOCK_MONOTONIC
    ifindex: int
    hook: int
    family: int
    protocol: int
    saddr: bytes  # 16 bytes, IPv4 in the first 4
    daddr: bytes
    sport: int
    dport: int
    orig_len: int  # the message's length (UDP per its header, TCP per its length prefix)
    payload: bytes = b""  # the captured prefix of it
    # What the kernel decided about the message.
    kind: int = KIND_MESSAGE
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
                      self.hook, self.is_response, self.rcode, self.status, self.protocol)


@dataclass(slots=True)
class DnsCounts:
    """Cumulative counters since the tracker was created."""

    events: int = 0  # samples received from the kernel
    names: int = 0  # of them, name samples (kind NAME: no flow of their own)
    requests: int = 0  # DNS requests (one per query: at the first pod interface), sampled or not
    responses: int = 0
    unanswered: int = 0
    parse_errors: int = 0  # packets with no readable DNS message (at most one per packet)
    aggregated: int = 0  # messages reported in aggregated flows (not sampled one by one)
    reclassified: int = 0  # sampled messages the kernel counted that dnspython rejects
    truncated: int = 0  # samples read from an incomplete capture


@functools.lru_cache(maxsize=65536)
def _ip(family: int, raw: bytes) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def dns_flow(node_name: str, *, family: int, saddr: bytes, daddr: bytes, protocol: int, sport: int, dport: int,
             ifindex: int, iface: Interface | None, kind: EventKind, info: DnsInfo, time_ns: int,
             latency_ns: int, extensions: Mapping[str, object] | None = None) -> Flow:
    """The one place a DNS flow record is built (Hubble's L7 shape). ``kind`` is
    DNS_REQUEST, DNS_RESPONSE or DNS_UNANSWERED.

    ``traffic_direction`` is the client pod's, whichever interface counted the message: a
    request (and an unanswered one) is its EGRESS, a response its INGRESS. A message is
    counted once, at the first pod interface it crosses, so a response is usually counted
    at the server's veth; Retina's DNS plugin, which counts the same way, derives the direction
    from QR just so, and with Retina's ``sourceEgressContext``/``destinationIngressContext``
    strings the request then labels the client as its source and the response the client as
    its destination."""
    unanswered = kind is EventKind.DNS_UNANSWERED
    return Flow(
        time_ns=time_ns,
        node_name=node_name,
        # An unanswered query is an error of the exchange, as Cilium's proxy reports one whose
        # upstream failed: nobody can take it for a second request.
        verdict=Verdict.ERROR if unanswered else Verdict.FORWARDED,
        ip_version=family,
        src_ip=_ip(family, saddr),
        dst_ip=_ip(family, daddr),
        protocol=protocol,
        src_port=sport,
        dst_port=dport,
        kind=kind,
        traffic_direction=TrafficDirection.INGRESS if kind is EventKind.DNS_RESPONSE else TrafficDirection.EGRESS,
        is_reply=None if unanswered else kind is EventKind.DNS_RESPONSE,
        ethertype=0x86DD if family == 6 else 0x0800,
        ifindex=ifindex,
        ifname=iface.name if iface is not None else "",
        l7=info,
        latency_ns=latency_ns,
        extensions=frozen_extensions(extensions or {}),
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
    """Turns the kernel's DNS samples, aggregates and expired requests into flows and counts.

    Not thread-safe: one thread feeds it (the ring buffer reader).
    """

    def __init__(
        self,
        *,
        node_name: str,
        timeout_ns: int,
        interface_of: Callable[[int], Interface | None],
        wall_offset_ns: Callable[[], int],
    ) -> None:
        self.node_name = node_name
        self.timeout_ns = timeout_ns
        self.counts = DnsCounts()
        self._interface_of = interface_of
        self._wall_offset_ns = wall_offset_ns
        self.last_parse_error = ""
        # Only the shape of flowtel_dns_latency_seconds: every exchange is timed in the kernel.
        self._latency = Histogram(DNS_LATENCY_BOUNDS)
        # Per aggregation buffer (slot): MESSAGE samples seen of each kernel key, and how many
        # samples dnspython rejected although the kernel read their header and question.
        self._sampled: tuple[dict[AggKey, int], dict[AggKey, int]] = ({}, {})
        self._rejected: tuple[dict[AggKey, int], dict[AggKey, int]] = ({}, {})
        # name hash -> query, and (name hash, qtype, rcode) -> last answer, for aggregated
        # flows (a name sample is sent once an interval, whatever the interface).
        self._names: dict[int, str] = {}
        self._answers: dict[tuple[int, int, int], DnsMessage] = {}
        # What an aggregated flow is made of, built once and reused while it holds (the cost
        # of a drain is then a dict lookup and a tuple per key, not a record built from
        # nothing: 35 µs → ~4 µs a key, measured): l7 per (name hash, qtype, rcode, QR) with
        # the name and answer it was built from, and the record per kernel key (everything
        # but time and count) with the l7 and interface it was built from. Templates are those
        # of the last drain only, so they are bounded by max_aggregates.
        self._key_infos: dict[tuple[int, int, int, int], tuple[str | None, DnsMessage | None, DnsInfo]] = {}
        self._templates: dict[AggKey, tuple[DnsInfo, Interface | None, Flow]] = {}
        # id(parsed message) -> (it, its l7 for a per-message flow): parse_shared hands out the
        # same object for every message that differs only in its ID; holding it keeps its id
        # unique.
        self._infos: dict[int, tuple[DnsMessage, DnsInfo]] = {}
        # (name hash, qtype) -> l7 of a bare query (_bare_query): the kernel's hash and qtype
        # say which, as they name aggregated flows.
        self._query_infos: dict[tuple[int, int], DnsInfo] = {}
        # Pending-map keys of sampled requests dnspython rejected (not unanswered when they expire).
        self._rejected_requests: dict[tuple[bytes, bytes, int, int, int, int, int, int], None] = {}

    # -- samples --------------------------------------------------------------------------

    def process(self, events: list[DnsEvent]) -> list[Flow]:
        """Flows for a batch of samples, in order. Malformed messages are counted, not raised."""
        out: list[Flow] = []
        offset = self._wall_offset_ns()
        ifaces: dict[int, Interface | None] = {}
        counts = self.counts
        for ev in events:
            counts.events += 1
            if ev.kind == KIND_NAME:
                counts.names += 1
                self._learn(ev)
                continue
            info = self._sample(ev)
            if info is None:
                continue
            iface = ifaces.get(ev.ifindex)
            if iface is None and ev.ifindex not in ifaces:
                iface = ifaces[ev.ifindex] = self._interface_of(ev.ifindex)
            out.append(self._sampled_flow(ev, info, iface, offset))
        return out

    def _learn(self, ev: DnsEvent) -> None:
        """A name sample: its name and answer for the aggregates; it is counted there."""
        if ev.status == STATUS_OK and not ev.is_response and ev.name_hash:
            # A request teaches nothing more than its name, which the kernel has read and
            # checked already: no dnspython message for it (it is validated whole only when
            # sampled as a MESSAGE, as every message over the budget is).
            if ev.name_hash in self._names:
                return
            try:
                _remember(self._names, ev.name_hash, question_name(ev.payload), MAX_NAMES)
                return
            except MalformedMessage:
                pass  # the capture ended inside the name: the parse below says what it is
        self._parse(ev, ev.agg_key(), None)

    def _sample(self, ev: DnsEvent) -> DnsInfo | None:
        """A MESSAGE sample the kernel has counted: parsed for its flow, never counted again."""
        key = ev.agg_key()
        sampled = self._sampled[ev.slot & 1]
        sampled[key] = sampled.get(key, 0) + 1
        info = self._bare_query(ev)
        if info is not None:
            return info
        msg = self._parse(ev, key, sampled)
        return None if msg is None else self._info_of(msg)

    def _bare_query(self, ev: DnsEvent) -> DnsInfo | None:
        """l7 of a whole QUERY request that holds its question and nothing else, without
        dnspython: the kernel has checked all of it already (header, name, qtype and qclass
        inside the message), so dnspython could only agree. None for any other message."""
        p = ev.payload
        if (ev.is_response or ev.status != STATUS_OK or not ev.name_hash or len(p) < ev.orig_len
                or len(p) < DNS_BARE_QUERY_LEN or p[4:12] != _ONE_QUESTION_ONLY or p[2] & _OPCODE_MASK):
            return None
        ik = (ev.name_hash, ev.qtype)
        info = self._query_infos.get(ik)
        if info is None:
            try:
                query = question_name(p)
            except MalformedMessage:
                return None  # dnspython's parse says what it is
            info = DnsInfo(query=query, qtypes=(type_text(ev.qtype),))
            if len(self._query_infos) >= MAX_INFOS:
                self._query_infos.clear()
            self._query_infos[ik] = info
        if ev.name_hash not in self._names:
            _remember(self._names, ev.name_hash, info.query, MAX_NAMES)
        return info

    def _parse(self, ev: DnsEvent, key: AggKey, sampled: dict[AggKey, int] | None) -> DnsMessage | None:
        complete = len(ev.payload) >= ev.orig_len
        wire = ev.payload[: ev.orig_len] if complete else ev.payload
        try:
            msg = parse_shared(wire, complete)
        except MalformedMessage as exc:
            self.last_parse_error = str(exc)
            if ev.status == STATUS_OK and not complete:
                # The capture (capture_bytes) ended before what dnspython needs, though the
                # kernel read the question: the message is fine, only its sample is short. It
                # is reported in its key's aggregate.
                if sampled is not None:
                    sampled[key] -= 1
                return None
            if ev.status == STATUS_OK:
                # The kernel read its header and question; the records are bad. It counts as a
                # parse error, not as a message (reconcile() takes it out of the kernel's count).
                rejected = self._rejected[ev.slot & 1]
                rejected[key] = rejected.get(key, 0) + 1
                if sampled is None:
                    # A name sample: out of its key's aggregate flow too (it is no message).
                    sampled = self._sampled[ev.slot & 1]
                    sampled[key] = sampled.get(key, 0) + 1
                if not ev.is_response and len(wire) >= 2:
                    # Nor is it a request waiting for an answer: its pending entry is ignored.
                    pk = (ev.saddr, ev.daddr, ev.ifindex, ev.sport, ev.dport, (wire[0] << 8) | wire[1], ev.family,
                          ev.protocol)
                    _remember(self._rejected_requests, pk, None, MAX_NAMES)
            return None
        if ev.status != STATUS_OK:
            # The kernel's verdict stands (it counted a parse error); dnspython was lenient
            # where the kernel is strict (e.g. a compression pointer in the first question).
            return None
        if not complete:
            self.counts.truncated += 1
        if ev.name_hash and ev.name_hash not in self._names:
            _remember(self._names, ev.name_hash, msg.query, MAX_NAMES)
        if msg.is_response:
            _remember(self._answers, (ev.name_hash, ev.qtype, ev.rcode), msg, MAX_ANSWERS)
        return msg

    def _info_of(self, msg: DnsMessage) -> DnsInfo:
        held = self._infos.get(id(msg))
        if held is not None and held[0] is msg:
            return held[1]
        info = DnsInfo(query=msg.query, qtypes=tuple(msg.qtypes), rcode=msg.rcode, ips=tuple(msg.ips),
                       ttl=msg.ttl, cnames=tuple(msg.cnames), rrtypes=tuple(msg.rrtypes)) if msg.is_response \
            else DnsInfo(query=msg.query, qtypes=tuple(msg.qtypes))
        if len(self._infos) >= MAX_INFOS:
            self._infos.clear()
        self._infos[id(msg)] = (msg, info)
        return info

    def _sampled_flow(self, ev: DnsEvent, info: DnsInfo, iface: Interface | None, offset: int) -> Flow:
        # The header's QR bit, which the kernel read as dnspython does.
        return dns_flow(self.node_name, family=ev.family, saddr=ev.saddr, daddr=ev.daddr, protocol=ev.protocol,
                        sport=ev.sport, dport=ev.dport, ifindex=ev.ifindex, iface=iface,
                        kind=EventKind.DNS_RESPONSE if ev.is_response else EventKind.DNS_REQUEST, info=info,
                        time_ns=ev.ts_ns + offset, latency_ns=ev.latency_ns)

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
        templates, used = self._templates, {}
        ifaces: dict[int, Interface | None] = {}
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
                if key.ifindex in ifaces:
                    iface = ifaces[key.ifindex]
                else:
                    iface = ifaces[key.ifindex] = self._interface_of(key.ifindex)
                info = self._key_info(key)
                ext: dict[str, object] = {EXTENSION_AGGREGATED: True, EXTENSION_COUNT: rest}
                if not info.query and key.name_hash:
                    ext[EXTENSION_QUERY_HASH] = f"{key.name_hash:016x}"
                # Scalars only: frozen as they are (frozen_extensions would walk them).
                extensions = FrozenDict(ext)
                held = templates.get(key)
                if held is None or held[0] is not info or held[1] is not iface:
                    # A key not seen last drain (every key, in an agent's first interval): built
                    # once with its time and count, and kept as the template for the next drain
                    # (a build and a _replace cost 9 µs a key where the build alone costs 6).
                    flow = self._aggregated_flow(key, info, iface, agg.last_ns + offset, extensions)
                    used[key] = (info, iface, flow)
                    out.append(flow)
                    continue
                used[key] = held
                out.append(held[2]._replace(time_ns=agg.last_ns + offset, extensions=extensions))
        self._templates = used
        # Samples of messages the kernel had no room to key are in its node totals already.
        sampled.clear()
        rejected.clear()
        return out

    def count_unkeyed(self, requests: int, responses: int, malformed: int) -> None:
        """Messages the kernel counted in its node totals only (its aggregation map was full)."""
        self.counts.requests += requests
        self.counts.responses += responses
        self.counts.parse_errors += malformed

    def _name(self, name_hash: int) -> str | None:
        return self._names.get(name_hash) if name_hash else None

    def _key_info(self, key: AggKey) -> DnsInfo:
        """l7 of a key's aggregated flow: its name, and for a response the answer last sampled
        for its name, qtype and rcode; rebuilt only when either changed."""
        named = self._name(key.name_hash)
        last = self._answers.get((key.name_hash, key.qtype, key.rcode)) if key.is_response else None
        ik = (key.name_hash, key.qtype, key.rcode, key.is_response)
        held = self._key_infos.get(ik)
        if held is not None and held[0] is named and held[1] is last:
            return held[2]
        qtypes = (type_text(key.qtype),) if key.name_hash else ()
        query = named if named is not None else ""
        if last is not None:
            info = DnsInfo(query=query, qtypes=qtypes, rcode=last.rcode, ips=tuple(last.ips), ttl=last.ttl,
                           cnames=tuple(last.cnames), rrtypes=tuple(last.rrtypes))
        else:
            info = DnsInfo(query=query, qtypes=qtypes, rcode=key.rcode)
        # Bounded as the tables it is built from are (names × answers' qtypes and rcodes).
        _remember(self._key_infos, ik, (named, last, info), 2 * MAX_NAMES)
        return info

    def _aggregated_flow(self, key: AggKey, info: DnsInfo, iface: Interface | None, time_ns: int,
                         extensions: FrozenDict) -> Flow:
        """A key's aggregated flow (a later drain of the same key replaces only time and count)."""
        # The server's port on its side; the clients' ports are many, so 0.
        sport, dport = (key.port, 0) if key.is_response else (0, key.port)
        return dns_flow(self.node_name, family=key.family, saddr=key.saddr, daddr=key.daddr,
                        protocol=key.protocol, sport=sport, dport=dport, ifindex=key.ifindex,
                        iface=iface, kind=EventKind.DNS_RESPONSE if key.is_response else EventKind.DNS_REQUEST,
                        info=info, time_ns=time_ns, latency_ns=0, extensions=extensions)

    def kernel_unanswered(self, expired: list[Expired]) -> list[Flow]:
        """Flows for requests the kernel's pending map held past the timeout: one each
        (as its request, timed when the wait ran out), or aggregated beyond MAX_UNANSWERED_FLOWS."""
        if self._rejected_requests:
            rejected = self._rejected_requests
            kept = []
            for e in expired:
                k = (e.client, e.server, e.ifindex, e.client_port, e.server_port, e.id, e.family, e.protocol)
                if k in rejected:
                    del rejected[k]
                else:
                    kept.append(e)
            expired = kept
        if not expired:
            return []
        self.counts.unanswered += len(expired)
        offset = self._wall_offset_ns()
        timeout = self.timeout_ns
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
        info = DnsInfo(query=named or "", qtypes=(type_text(e.qtype),) if e.name_hash else ())
        extensions: dict[str, object] = {EXTENSION_UNANSWERED: True}
        if count is not None:
            extensions.update({EXTENSION_AGGREGATED: True, EXTENSION_COUNT: count})
        if named is None and e.name_hash:
            extensions[EXTENSION_QUERY_HASH] = f"{e.name_hash:016x}"
        return dns_flow(self.node_name, family=e.family, saddr=e.client, daddr=e.server, protocol=e.protocol,
                        sport=client_port, dport=e.server_port, ifindex=e.ifindex,
                        iface=self._interface_of(e.ifindex), kind=EventKind.DNS_UNANSWERED, info=info, time_ns=time_ns,
                        latency_ns=0, extensions=extensions)

    def metric_points(self, now_ns: int, kernel_latency: KernelLatency | None = None) -> list[MetricPoint]:
        """Node-level cumulative counters and the latency histogram (no labels: per-pod detail
        is in the flows), every exchange timed in the kernel."""
        c = self.counts
        latency = self._latency.point(METRIC_LATENCY, now_ns, unit="s",
                                     description="Latency of DNS responses matched to their request (kernel "
                                                 "timestamps where each was counted)")
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
                        description="DNS requests observed (once each, at the first pod interface)"),
            MetricPoint(METRIC_RESPONSES, float(c.responses), MetricKind.SUM, now_ns,
                        description="DNS responses observed (once each, at the first pod interface)"),
            MetricPoint(METRIC_UNANSWERED, float(c.unanswered), MetricKind.SUM, now_ns,
                        description="DNS requests with no response within the timeout"),
            MetricPoint(METRIC_PARSE_ERRORS, float(c.parse_errors), MetricKind.SUM, now_ns,
                        description="DNS-port packets that held no readable DNS message"),
            latency,
        ]
