"""Record types that travel through the pipeline.

Everything the kernel reports becomes a :class:`Flow`, Hubble's own model: an aggregated
L3/L4 flow, a DNS request or response (L7), a drop, a TCP event. One type keeps every
processor and exporter uniform; optional parts stay ``None`` until something fills them.
Records are slotted dataclasses because receivers create tens of thousands per interval.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Verdict(enum.StrEnum):
    FORWARDED = "FORWARDED"
    DROPPED = "DROPPED"
    AUDIT = "AUDIT"
    ERROR = "ERROR"


class TrafficDirection(enum.StrEnum):
    """Direction from the pod's point of view (Hubble's convention)."""

    INGRESS = "INGRESS"
    EGRESS = "EGRESS"
    UNKNOWN = "TRAFFIC_DIRECTION_UNKNOWN"


class FlowType(enum.StrEnum):
    L3_L4 = "L3_L4"
    L7 = "L7"


# IANA protocol numbers used in records and their names as Hubble prints them.
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132

# TCP flag bits exactly as in the TCP header's flags byte (and in bpf/flowtel.h).
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

TCP_FLAG_NAMES: tuple[tuple[int, str], ...] = (
    (TCP_SYN, "SYN"),
    (TCP_ACK, "ACK"),
    (TCP_FIN, "FIN"),
    (TCP_RST, "RST"),
    (TCP_PSH, "PSH"),
    (TCP_URG, "URG"),
    (TCP_ECE, "ECE"),
    (TCP_CWR, "CWR"),
)


@dataclass(slots=True)
class Workload:
    name: str
    kind: str


@dataclass(slots=True)
class Endpoint:
    """One end of a flow, as Hubble's ``Endpoint`` message. Filled by processors."""

    identity: int = 0
    namespace: str = ""
    pod_name: str = ""
    labels: list[str] = field(default_factory=list)
    workloads: list[Workload] = field(default_factory=list)
    cluster_name: str = ""
    # OTel semantic-convention attributes for this end (k8s.pod.name, …).
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class DnsInfo:
    """``l7.dns`` of a Hubble flow."""

    query: str
    qtypes: list[str] = field(default_factory=list)
    rcode: int = 0
    ips: list[str] = field(default_factory=list)
    ttl: int = 0
    cnames: list[str] = field(default_factory=list)
    rrtypes: list[str] = field(default_factory=list)
    observation_source: str = "ebpf"


@dataclass(slots=True)
class Flow:
    """One Hubble-shaped flow record.

    ``time_ns`` is wall-clock nanoseconds. For aggregated L3/L4 flows ``packets`` and
    ``bytes`` are the interval's counts (Retina puts them in ``extensions``), and
    ``tcp_flags`` is the union of the flags seen.
    """

    time_ns: int
    node_name: str
    verdict: Verdict
    ip_version: int  # 4, 6, or 0 for frames that are not IP (then ``ethertype`` says what)
    src_ip: str
    dst_ip: str
    protocol: int  # IANA number; 0 when not IP
    src_port: int = 0  # ICMP: type
    dst_port: int = 0  # ICMP: code
    flow_type: FlowType = FlowType.L3_L4
    traffic_direction: TrafficDirection = TrafficDirection.UNKNOWN
    is_reply: bool | None = None
    ethertype: int = 0x0800
    ifindex: int = 0
    ifname: str = ""
    packets: int = 0
    bytes: int = 0
    tcp_flags: int = 0
    tcp_flag_counts: dict[str, int] | None = None
    drop_reason: str = ""
    l7: DnsInfo | None = None
    l7_type: str = ""  # REQUEST | RESPONSE
    latency_ns: int = 0
    source: Endpoint | None = None
    destination: Endpoint | None = None
    source_names: list[str] = field(default_factory=list)
    destination_names: list[str] = field(default_factory=list)
    extensions: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class LostEvents:
    """Records that never reached an output, by where they were lost (``hubble_lost_events_total``)."""

    time_ns: int
    source: str
    count: int
    node_name: str = ""


class MetricKind(enum.StrEnum):
    SUM = "sum"  # monotonic counter, cumulative since the agent started
    GAUGE = "gauge"
    # Explicit-bucket histogram, cumulative since the agent started (OTLP's HistogramDataPoint):
    # ``value`` is the sum of the observations, ``count`` their number, ``bucket_counts`` the
    # observations per bucket (not cumulative), one more than ``bounds``.
    HISTOGRAM = "histogram"


@dataclass(slots=True)
class MetricPoint:
    """One data point of a metric family, as receivers read it (node counters, kernel maps).

    Batches travel the ``metrics`` pipelines; exporters map them to OTLP/Prometheus.

    A HISTOGRAM point has ``value`` = the sum of its observations and, besides, ``bounds``
    (explicit bucket upper bounds, strictly increasing; bucket ``i`` holds values in
    ``(bounds[i-1], bounds[i]]``, the last one everything above ``bounds[-1]``),
    ``bucket_counts`` (per bucket, ``len(bounds) + 1`` of them, as OTLP) and ``count``
    (their total). SUM and GAUGE points leave those three empty.
    """

    name: str  # e.g. "networkobservability_drop_count"
    value: float
    kind: MetricKind
    time_ns: int
    attributes: dict[str, str] = field(default_factory=dict)
    unit: str = ""
    description: str = ""
    bounds: tuple[float, ...] = ()
    bucket_counts: tuple[int, ...] = ()
    count: int = 0
    # SUM/HISTOGRAM: wall-clock ns since which the source has been counting this series, when
    # it knows (e.g. a counter since boot); 0 = unknown, and exporters use the first reading.
    start_time_ns: int = 0


Record = Flow | LostEvents | MetricPoint

# An L7 record that stands for several messages (the ebpf receiver's DNS at high rates, see
# receiver/ebpf/README.md) says so in ``extensions``: {"aggregated": true, "count": N}.
EXTENSION_AGGREGATED = "aggregated"
EXTENSION_COUNT = "count"


def message_count(flow: Flow) -> int:
    """How many L7 messages (Hubble flow events) an L7 record stands for: 1, or its count."""
    ext = flow.extensions
    if ext and ext.get(EXTENSION_AGGREGATED):
        return int(ext.get(EXTENSION_COUNT, 1))
    return 1


def signal_of(record: Record) -> str:
    """The pipeline signal a record travels: ``metrics`` or ``logs``."""
    return "metrics" if isinstance(record, MetricPoint) else "logs"
