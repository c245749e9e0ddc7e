"""Record types that travel through the pipeline, and the kind each record is.

Everything the kernel reports becomes a :class:`Flow`, Hubble's own model: an aggregated
L3/L4 packet flow, a DNS request, response or unanswered query (L7), a drop, a TCP socket
event. What a flow *is* lives in one typed field, :attr:`Flow.kind` (an :class:`EventKind`);
nothing downstream reads it from ``extensions`` keys or guesses it from other fields.

Records are immutable: :class:`Flow` is a named tuple, the rest frozen slotted
dataclasses; their sequences are tuples and their mappings read-only (:class:`FrozenDict`).
The fan-out hands the same record to every pipeline, so a processor that wants a different
record builds a new one (:func:`replace`) and cached parts (an enrichment cache's
:class:`Endpoint`) are shared, never copied.
The per-record tables (protocol names, TCP flags, DNS rcodes, Cilium's event types and
drop reasons) live next to these types, in :mod:`flowtel.recordtables`.
"""
from __future__ import annotations

import dataclasses
import enum
import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, TypeVar, Union

_R = TypeVar("_R")

# -- protocol numbers and TCP flag bits (IANA; the TCP header's flags byte, as bpf/flowtel.h) --

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD


class Verdict(enum.StrEnum):
    """Cilium's ``flow.Verdict`` names (only the ones flowtel produces or parses)."""

    VERDICT_UNKNOWN = "VERDICT_UNKNOWN"
    FORWARDED = "FORWARDED"
    DROPPED = "DROPPED"
    ERROR = "ERROR"
    AUDIT = "AUDIT"
    REDIRECTED = "REDIRECTED"
    TRACED = "TRACED"
    TRANSLATED = "TRANSLATED"


class TrafficDirection(enum.StrEnum):
    """Direction from the pod's point of view (Hubble's convention)."""

    INGRESS = "INGRESS"
    EGRESS = "EGRESS"
    UNKNOWN = "TRAFFIC_DIRECTION_UNKNOWN"


class FlowType(enum.StrEnum):
    """Cilium's ``flow.FlowType``: what :attr:`Flow.flow_type` derives from the kind."""

    L3_L4 = "L3_L4"
    L7 = "L7"
    SOCK = "SOCK"


class EventKind(enum.Enum):
    """What one record stands for. Every producer names it; every consumer reads it here.

    ``PACKET`` records count packets (``packets``/``bytes`` over an interval); every other
    flow kind is one event. TCP kinds are socket events, not packets (their packets were
    already counted by a ``PACKET`` record); ``DNS_UNANSWERED`` is a query whose answer
    never came, not a second request; ``DROP_SAMPLE`` is one drop sent on its own for its
    detail (``drops.events_per_second``), a drop that a ``DROP`` record counts already:
    nothing counts it again (``extensions.drop_sample: true`` on the wire).
    """

    PACKET = "packet"
    DROP = "drop"
    DROP_SAMPLE = "drop_sample"
    DNS_REQUEST = "dns_request"
    DNS_RESPONSE = "dns_response"
    DNS_UNANSWERED = "dns_unanswered"
    TCP_ESTABLISHED = "established"
    TCP_CLOSED = "closed"
    TCP_RETRANSMIT = "retransmit"
    TCP_RESET_SENT = "reset_sent"
    TCP_RESET_RECEIVED = "reset_received"
    LOST_EVENTS = "lost_events"

    # Members are singletons compared by identity, so identity is their hash: in C, where
    # Enum's own hashes the name in Python (≈ 130 ns against ≈ 30 ns), and every per-batch
    # grouping (templates, connectors, counting once) keys on a kind.
    __hash__ = object.__hash__

    # Set once per member below (plain attributes: read per record, so no property calls
    # and no Enum hashing on the hot path).
    is_dns: bool
    is_tcp_event: bool
    tcp_event: str  # ``extensions.tcp_event`` for a TCP kind (``retransmit``, …), else ""


_DNS_KINDS = frozenset({EventKind.DNS_REQUEST, EventKind.DNS_RESPONSE, EventKind.DNS_UNANSWERED})
TCP_EVENT_KINDS = frozenset({EventKind.TCP_ESTABLISHED, EventKind.TCP_CLOSED, EventKind.TCP_RETRANSMIT,
                             EventKind.TCP_RESET_SENT, EventKind.TCP_RESET_RECEIVED})
TCP_EVENT_BY_NAME: Mapping[str, EventKind] = MappingProxyType({k.value: k for k in TCP_EVENT_KINDS})
for _kind in EventKind:
    _kind.is_dns = _kind in _DNS_KINDS
    _kind.is_tcp_event = _kind in TCP_EVENT_KINDS
    _kind.tcp_event = _kind.value if _kind.is_tcp_event else ""

# Values an ``extensions`` entry may hold: what a google.protobuf.Struct can carry.
ExtValue = Union[str, int, float, bool, None, tuple["ExtValue", ...], Mapping[str, "ExtValue"]]


class FrozenDict(dict[str, Any]):
    """A dict that refuses changes: records' mappings (``extensions``, endpoint attributes).

    A dict subclass rather than a mapping proxy so that JSON and OTLP encoders take it as the
    dict it is, at no conversion cost; hashable, so it can be a dataclass default.
    """

    __slots__ = ()

    def _refuse(self, *_args: Any, **_kwargs: Any) -> Any:
        raise TypeError("records are immutable: build a new mapping (frozen_extensions) and a new record")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # every mutator refuses

    def __hash__(self) -> int:  # type: ignore[override]  # dict is unhashable; a frozen one is not
        return hash(tuple(self.items())) if self else 0

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, _memo: Any) -> FrozenDict:
        return self if not self else FrozenDict({k: _freeze(v) for k, v in self.items()})

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))


NO_EXTENSIONS: FrozenDict = FrozenDict()


def frozen_extensions(values: Mapping[str, Any]) -> FrozenDict:
    """A read-only copy of ``values`` for :attr:`Flow.extensions` (lists become tuples)."""
    if not values:
        return NO_EXTENSIONS
    if values.__class__ is FrozenDict:
        return values  # already frozen all the way down
    return FrozenDict({str(k): _freeze(v) for k, v in values.items()})


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return frozen_extensions(value)
    return value


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    kind: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a flow, as Hubble's ``Endpoint`` message. Made by processors, shared:
    an enrichment cache hands the same object to every record of the same pod."""

    identity: int = 0
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()
    workloads: tuple[Workload, ...] = ()
    cluster_name: str = ""
    # OTel semantic-convention attributes for this end (k8s.pod.name, …); read-only.
    attributes: Mapping[str, str] = NO_EXTENSIONS
    # Its Hubble JSON once built (flowtel.lib.hubble.convert): a memo, not a field.
    json_memo: Any = field(default=None, init=False, compare=False, repr=False, hash=False)


@dataclass(frozen=True, slots=True)
class DnsInfo:
    """``l7.dns`` of a Hubble flow."""

    query: str
    qtypes: tuple[str, ...] = ()
    rcode: int = 0
    ips: tuple[str, ...] = ()
    ttl: int = 0
    cnames: tuple[str, ...] = ()
    rrtypes: tuple[str, ...] = ()
    observation_source: str = "ebpf"


@dataclass(frozen=True, slots=True)
class TcpFlagCounts:
    """Packets of an aggregated TCP flow that carried each flag Hubble counts
    (``extensions.tcp_flags``: ``{"SYN": n, "SYN-ACK": n, "FIN": n, "RST": n}``)."""

    syn: int = 0
    syn_ack: int = 0
    fin: int = 0
    rst: int = 0

    def __add__(self, other: TcpFlagCounts) -> TcpFlagCounts:
        return TcpFlagCounts(self.syn + other.syn, self.syn_ack + other.syn_ack,
                             self.fin + other.fin, self.rst + other.rst)

    def as_dict(self) -> dict[str, int]:
        return {"SYN": self.syn, "SYN-ACK": self.syn_ack, "FIN": self.fin, "RST": self.rst}


class WireMemo:
    """Where a record keeps its Hubble wire form once built (flowtel.lib.hubble.convert).

    A memo of the record's fields, not one of them: it compares equal to any other memo,
    so two records with the same fields are equal whether or not either was encoded yet.
    """

    __slots__ = ("form",)

    def __init__(self) -> None:
        self.form: Any = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WireMemo)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "…"

    def __reduce__(self) -> tuple[Any, ...]:
        return (WireMemo, ())  # a copy or unpickled record encodes afresh


class _FlowFields(NamedTuple):
    time_ns: int
    node_name: str
    verdict: Verdict
    ip_version: int  # 4, 6, or 0 for frames that are not IP (then ``ethertype`` says what)
    src_ip: str
    dst_ip: str
    protocol: int  # IANA number; 0 when not IP
    src_port: int = 0  # ICMP: type
    dst_port: int = 0  # ICMP: code
    kind: EventKind = EventKind.PACKET
    traffic_direction: TrafficDirection = TrafficDirection.UNKNOWN
    is_reply: bool | None = None
    ethertype: int = ETHERTYPE_IPV4
    ifindex: int = 0
    ifname: str = ""
    packets: int = 0
    bytes: int = 0
    tcp_flags: int = 0
    tcp_flag_counts: TcpFlagCounts | None = None
    drop_reason: str = ""
    l7: DnsInfo | None = None
    latency_ns: int = 0
    source: Endpoint | None = None
    destination: Endpoint | None = None
    source_names: tuple[str, ...] = ()
    destination_names: tuple[str, ...] = ()
    extensions: Mapping[str, ExtValue] = NO_EXTENSIONS
    # Filled by the constructor with a fresh WireMemo; never pass one.
    wire_memo: WireMemo = None  # type: ignore[assignment]  # replaced by a fresh memo in Flow.__new__


class Flow(_FlowFields):
    """One Hubble-shaped flow record: an immutable named tuple.

    ``time_ns`` is wall-clock nanoseconds. For ``PACKET`` (and aggregated ``DROP``) records
    ``packets`` and ``bytes`` are the interval's counts (Retina puts them in ``extensions``),
    ``tcp_flags`` is the union of the flags seen and ``tcp_flag_counts`` the packets per
    flag. ``drop_reason`` is the kernel's (or flowtel's datapath's) reason name; the Cilium
    ``DropReason`` it maps to comes from :func:`flowtel.recordtables.cilium_drop_reason`.
    ``extensions`` holds flowtel-only detail of the kind (read-only; see
    :func:`frozen_extensions`). Only the first seven fields are required; build a changed
    copy with :func:`replace`.

    A named tuple rather than a frozen dataclass: it is as cheap to build as a mutable
    slotted dataclass (a frozen one costs ~4x, measured), and receivers build tens of
    thousands per interval.
    """

    __slots__ = ()

    def _replace(self, **changes: Any) -> Flow:
        values = list(self)
        index = _FLOW_INDEX
        for name, value in changes.items():
            values[index[name]] = value  # KeyError: not a field of Flow
        values[-1] = WireMemo()  # a changed record has a wire form of its own
        return tuple.__new__(Flow, values)

    def with_endpoints(self, source: Endpoint | None, destination: Endpoint | None) -> Flow:
        """The record with both ends named (what enrichment does to every record, so it is
        one tuple built in place rather than a general replace: the fields unpacked by
        position, as FLOW_FIELDS orders them; slices and ``*`` would build two slices and a
        list first)."""
        (time_ns, node_name, verdict, ip_version, src_ip, dst_ip, protocol, src_port, dst_port, kind,
         direction, is_reply, ethertype, ifindex, ifname, packets, nbytes, tcp_flags, flag_counts, drop_reason,
         l7, latency_ns, _, _, source_names, destination_names, extensions, _) = self
        return _tuple_new(Flow, (time_ns, node_name, verdict, ip_version, src_ip, dst_ip, protocol, src_port,
                                 dst_port, kind, direction, is_reply, ethertype, ifindex, ifname, packets, nbytes,
                                 tcp_flags, flag_counts, drop_reason, l7, latency_ns, source, destination,
                                 source_names, destination_names, extensions, WireMemo()))

    @property
    def flow_type(self) -> FlowType:
        kind = self.kind
        if kind.is_dns:
            return FlowType.L7
        if kind.is_tcp_event:
            return FlowType.SOCK
        return FlowType.L3_L4

    @property
    def l7_type(self) -> str:
        """Hubble's ``l7.type``: ``REQUEST``, ``RESPONSE``, or ``""`` (not L7, or unanswered)."""
        kind = self.kind
        if kind is EventKind.DNS_REQUEST:
            return "REQUEST"
        if kind is EventKind.DNS_RESPONSE:
            return "RESPONSE"
        return ""

    @property
    def is_packets(self) -> bool:
        """Whether the record counts packets (an aggregated flow or a drop), not an event about them."""
        return self.kind is EventKind.PACKET or self.kind is EventKind.DROP

    @property
    def tcp_event(self) -> str:
        return self.kind.tcp_event


def _flow_new() -> Any:
    # The constructor, generated once: keyword defaults as declared, a fresh memo each.
    names = _FlowFields._fields
    defaults = _FlowFields._field_defaults
    params = [f"{n}=_defaults[{n!r}]" if n in defaults else n for n in names[:-1]]
    values = ", ".join(names[:-1])
    src = (f"def __new__(cls, {', '.join(params)}, wire_memo=None):\n"
           f"    return _tuple_new(cls, ({values}, _WireMemo() if wire_memo is None else wire_memo))\n")
    namespace: dict[str, Any] = {"_defaults": defaults, "_tuple_new": tuple.__new__, "_WireMemo": WireMemo}
    exec(src, namespace)  # noqa: S102  # generated from the field list above, no outside input
    return namespace["__new__"]


_FLOW_INDEX = {name: i for i, name in enumerate(_FlowFields._fields[:-1])}
Flow.__new__ = _flow_new()  # type: ignore[method-assign]  # keeps NamedTuple's signature
FLOW_FIELDS: tuple[str, ...] = _FlowFields._fields[:-1]
# Flow.with_endpoints unpacks a record by position: the field order it spells out.
assert FLOW_FIELDS == (
    "time_ns", "node_name", "verdict", "ip_version", "src_ip", "dst_ip", "protocol", "src_port", "dst_port", "kind",
    "traffic_direction", "is_reply", "ethertype", "ifindex", "ifname", "packets", "bytes", "tcp_flags",
    "tcp_flag_counts", "drop_reason", "l7", "latency_ns", "source", "destination", "source_names",
    "destination_names", "extensions"), "Flow's fields changed: update Flow.with_endpoints"


def flow_fields(*names: str) -> Callable[[Flow], tuple[Any, ...]]:
    """A reader of the named fields of a flow, as one tuple in one C call: per-record code
    that reads many fields (an encoder's shape key) would otherwise pay a descriptor call for
    each. Two or more names (one name gives the bare value, as ``operator.itemgetter`` does)."""
    if len(names) < 2:
        raise ValueError("flow_fields reads two or more fields; read one as an attribute")
    return operator.itemgetter(*(_FLOW_INDEX[n] for n in names))
FLOW_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(_FlowFields._field_defaults))


# The fields after ``tcp_flag_counts`` as a packet record leaves the receiver (their defaults).
_PACKET_TAIL_START = _FLOW_INDEX["drop_reason"]
assert _PACKET_TAIL_START == _FLOW_INDEX["tcp_flag_counts"] + 1 and _FLOW_INDEX["tcp_flag_counts"] == 18
_PACKET_TAIL = tuple(_FlowFields._field_defaults[n] for n in _FlowFields._fields[_PACKET_TAIL_START:-1])


def packet_flow(time_ns: int, node_name: str, ip_version: int, src_ip: str, dst_ip: str, protocol: int,
                src_port: int, dst_port: int, traffic_direction: TrafficDirection, is_reply: bool | None,
                ethertype: int, ifindex: int, ifname: str, packets: int, bytes: int, tcp_flags: int,
                tcp_flag_counts: TcpFlagCounts | None) -> Flow:
    """A forwarded ``PACKET`` record (what a drain of the kernel's flow maps gives, tens of
    thousands per interval): the same record as ``Flow(...)`` with these keywords, built
    positionally, which costs a third of the keyword call."""
    # The tail spelled out (what _PACKET_TAIL holds): one tuple built in place, where
    # ``*_PACKET_TAIL`` builds a list first and converts it.
    return _tuple_new(Flow, (time_ns, node_name, _FORWARDED, ip_version, src_ip, dst_ip, protocol,
                             src_port, dst_port, _PACKET, traffic_direction, is_reply, ethertype,
                             ifindex, ifname, packets, bytes, tcp_flags, tcp_flag_counts,
                             "", None, 0, None, None, (), (), NO_EXTENSIONS, WireMemo()))


_tuple_new = tuple.__new__
_FORWARDED, _PACKET = Verdict.FORWARDED, EventKind.PACKET
assert _PACKET_TAIL == ("", None, 0, None, None, (), (), NO_EXTENSIONS)


_flag_counts: dict[tuple[int, int, int, int], TcpFlagCounts] = {}


def tcp_flag_counts(syn: int, syn_ack: int, fin: int, rst: int) -> TcpFlagCounts:
    """A :class:`TcpFlagCounts`, shared by every record with the same counts (records are
    immutable; most flows carry 0 or 1 of each, and a frozen dataclass is slow to build)."""
    key = (syn, syn_ack, fin, rst)
    counts = _flag_counts.get(key)
    if counts is None:
        counts = TcpFlagCounts(syn, syn_ack, fin, rst)
        if len(_flag_counts) >= 4096:
            _flag_counts.clear()
        _flag_counts[key] = counts
    return counts


def replace(record: _R, **changes: Any) -> _R:
    """A copy of ``record`` with ``changes``: records are immutable, so this is how to change one."""
    if isinstance(record, Flow):
        return record._replace(**changes)  # type: ignore[return-value]  # Flow in, Flow out
    return dataclasses.replace(record, **changes)  # type: ignore[type-var]  # the other records are dataclasses


@dataclass(frozen=True, slots=True)
class LostEvents:
    """Records that never reached an output, by where they were lost (``hubble_lost_events_total``).

    ``source`` is flowtel's precise name (``FLOW_MAP_FULL``, ``QUEUE_FULL:exporter``, …);
    :func:`flowtel.recordtables.cilium_lost_source` maps it onto Cilium's enum.
    """

    time_ns: int
    source: str
    count: int
    node_name: str = ""

    @property
    def kind(self) -> EventKind:
        return EventKind.LOST_EVENTS


class MetricKind(enum.StrEnum):
    SUM = "sum"  # monotonic counter, cumulative since the agent started
    GAUGE = "gauge"
    # Explicit-bucket histogram, cumulative since the agent started (OTLP's HistogramDataPoint):
    # ``value`` is the sum of the observations, ``count`` their number, ``bucket_counts`` the
    # observations per bucket (not cumulative), one more than ``bounds``.
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One data point of a metric family, as receivers read it (node counters, kernel maps).

    Batches travel the ``metrics`` pipelines; exporters map them to OTLP/Prometheus.

    A HISTOGRAM point has ``value`` = the sum of its observations and, besides, ``bounds``
    (explicit bucket upper bounds, strictly increasing; bucket ``i`` holds values in
    ``(bounds[i-1], bounds[i]]``, the last one everything above ``bounds[-1]``),
    ``bucket_counts`` (per bucket, ``len(bounds) + 1`` of them, as OTLP) and ``count``
    (their total). SUM and GAUGE points leave those three empty. ``attributes`` is
    read-only once the point is made.
    """

    name: str  # e.g. "networkobservability_drop_count"
    value: float
    kind: MetricKind
    time_ns: int
    attributes: Mapping[str, str] = field(default_factory=dict)
    unit: str = ""
    description: str = ""
    bounds: tuple[float, ...] = ()
    bucket_counts: tuple[int, ...] = ()
    count: int = 0
    # SUM/HISTOGRAM: wall-clock ns since which the source has been counting this series, when
    # it knows (e.g. a counter since boot); 0 = unknown, and exporters use the first reading.
    start_time_ns: int = 0


def _frozen_slots_init(cls: type) -> Any:
    """An ``__init__`` for a frozen slotted dataclass with the generated one's signature and
    effect, storing through the slots' own descriptors: the generated one stores each field
    with ``object.__setattr__(self, "name", value)``, which looks the name up on the type
    each time (a MetricPoint: ≈ 4x the cost; connectors build thousands per flush)."""
    params, body = [], []
    namespace: dict[str, Any] = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        namespace[f"_set{i}"] = getattr(cls, f.name).__set__
        if f.default is not dataclasses.MISSING:
            namespace[f"_default{i}"] = f.default
            params.append(f"{f.name}=_default{i}")
            body.append(f"    _set{i}(self, {f.name})")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory{i}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            body.append(f"    _set{i}(self, _factory{i}() if {f.name} is _MISSING else {f.name})")
        else:
            params.append(f.name)
            body.append(f"    _set{i}(self, {f.name})")
    namespace["_MISSING"] = dataclasses.MISSING
    exec(f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body) + "\n", namespace)  # noqa: S102  # generated from the class's own fields
    return namespace["__init__"]


MetricPoint.__init__ = _frozen_slots_init(MetricPoint)  # type: ignore[method-assign]  # same signature, faster stores

Record = Flow | LostEvents | MetricPoint

# An L7 record that stands for several messages (the ebpf receiver's DNS at high rates, see
# receiver/ebpf/README.md) says so in ``extensions``: {"aggregated": true, "count": N}.
EXTENSION_AGGREGATED = "aggregated"
EXTENSION_COUNT = "count"


def message_count(flow: Flow) -> int:
    """How many L7 messages (Hubble flow events) an L7 record stands for: 1, or its count."""
    ext = flow.extensions
    if ext and ext.get(EXTENSION_AGGREGATED):
        count = ext.get(EXTENSION_COUNT, 1)
        return int(count) if isinstance(count, (int, float, str)) else 1
    return 1


def signal_of(record: Record) -> str:
    """The pipeline signal a record travels: ``metrics`` or ``logs``."""
    return "metrics" if isinstance(record, MetricPoint) else "logs"
