"""A fixed set of flows covering every filter dimension, shared by filter, API and map tests.

Three namespaces, an external name and an IPv6 pair; each flow has a short name (``F1``…)
so a test states exactly which flows a filter must select.

    F1  shop/frontend -> shop/payments   TCP 41000->8080 SYN, EGRESS, request
    F2  shop/payments -> shop/frontend   TCP 8080->41000 reply, INGRESS, 1 ms handshake RTT
    F3  default/client -> shop/frontend  TCP 42000->80 DROPPED (NETFILTER_DROP), EGRESS
    F4  shop/frontend -> kube-system/coredns  DNS request www.example.com. (UDP 50000->53)
    F5  kube-system/coredns -> shop/frontend  DNS response, 2 ms latency
    F6  shop/frontend -> 93.184.216.34 (www.example.com)  TCP 43000->443, EGRESS
    F7  default/client -> shop/payments  ICMPv4 echo request, INGRESS
    F8  ARP frame (not IP), EGRESS
    F9  fd00::1 (api.internal.test) -> fd00::2  UDP 5000->6000, direction unknown
"""
from __future__ import annotations

from flowtel.records import (
    TCP_ACK,
    TCP_SYN,
    DnsInfo,
    Endpoint,
    EventKind,
    Flow,
    LostEvents,
    TcpFlagCounts,
    TrafficDirection,
    Verdict,
    Workload,
    frozen_extensions,
)

T0 = 1732621545_000000000  # 2024-11-26T11:45:45Z

FRONTEND = Endpoint(namespace="shop", pod_name="frontend-7c9d",
                    labels=("k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=shop"),
                    workloads=(Workload("frontend", "Deployment"),))
PAYMENTS = Endpoint(namespace="shop", pod_name="payments-0",
                    labels=("k8s:app=payments", "k8s:tier=backend", "k8s:io.kubernetes.pod.namespace=shop"),
                    workloads=(Workload("payments", "StatefulSet"),))
CLIENT = Endpoint(namespace="default", pod_name="client-1", labels=("k8s:app=client",))
COREDNS = Endpoint(namespace="kube-system", pod_name="coredns-abc", labels=("k8s:k8s-app=kube-dns",),
                   workloads=(Workload("coredns", "Deployment"),))

IP_FRONTEND, IP_PAYMENTS, IP_CLIENT, IP_DNS, IP_EXT = "10.0.0.1", "10.0.0.2", "10.0.1.1", "10.0.9.9", "93.184.216.34"


def _flow(i: int, **kw: object) -> Flow:
    fields: dict[str, object] = dict(time_ns=T0 + i * 1_000_000_000, node_name="node-1", verdict=Verdict.FORWARDED,
                                     ip_version=4, src_ip="", dst_ip="", protocol=0)
    fields.update(kw)
    return Flow(**fields)  # type: ignore[arg-type]


def sample_flows() -> dict[str, Flow]:
    """Fresh records each call (records are immutable; fresh ones carry no wire form yet)."""
    return {
        "F1": _flow(1, src_ip=IP_FRONTEND, dst_ip=IP_PAYMENTS, protocol=6, src_port=41000, dst_port=8080,
                    traffic_direction=TrafficDirection.EGRESS, is_reply=False, tcp_flags=TCP_SYN,
                    tcp_flag_counts=TcpFlagCounts(syn=1), packets=1, bytes=74,
                    ifindex=7, ifname="veth-front", source=FRONTEND, destination=PAYMENTS),
        "F2": _flow(2, src_ip=IP_PAYMENTS, dst_ip=IP_FRONTEND, protocol=6, src_port=8080, dst_port=41000,
                    traffic_direction=TrafficDirection.INGRESS, is_reply=True, tcp_flags=TCP_SYN | TCP_ACK,
                    packets=3, bytes=1200, source=PAYMENTS, destination=FRONTEND,
                    extensions=frozen_extensions({"handshake_rtt_ns": 1_000_000})),
        "F3": _flow(3, src_ip=IP_CLIENT, dst_ip=IP_FRONTEND, protocol=6, src_port=42000, dst_port=80,
                    verdict=Verdict.DROPPED, kind=EventKind.DROP, drop_reason="NETFILTER_DROP", tcp_flags=TCP_SYN, packets=2, bytes=120,
                    traffic_direction=TrafficDirection.EGRESS, source=CLIENT, destination=FRONTEND),
        "F4": _flow(4, src_ip=IP_FRONTEND, dst_ip=IP_DNS, protocol=17, src_port=50000, dst_port=53,
                    kind=EventKind.DNS_REQUEST, is_reply=False,
                    l7=DnsInfo(query="www.example.com.", qtypes=("A",)),
                    traffic_direction=TrafficDirection.EGRESS, source=FRONTEND, destination=COREDNS),
        "F5": _flow(5, src_ip=IP_DNS, dst_ip=IP_FRONTEND, protocol=17, src_port=53, dst_port=50000,
                    kind=EventKind.DNS_RESPONSE, is_reply=True, latency_ns=2_000_000,
                    l7=DnsInfo(query="www.example.com.", qtypes=("A",), ips=(IP_EXT,), ttl=300, rrtypes=("A",)),
                    traffic_direction=TrafficDirection.INGRESS, source=COREDNS, destination=FRONTEND),
        "F6": _flow(6, src_ip=IP_FRONTEND, dst_ip=IP_EXT, protocol=6, src_port=43000, dst_port=443,
                    traffic_direction=TrafficDirection.EGRESS, tcp_flags=TCP_ACK, packets=10, bytes=5000,
                    source=FRONTEND, destination=Endpoint(identity=2), destination_names=("www.example.com",)),
        "F7": _flow(7, src_ip=IP_CLIENT, dst_ip=IP_PAYMENTS, protocol=1, src_port=8, dst_port=0,
                    traffic_direction=TrafficDirection.INGRESS, packets=1, bytes=98,
                    source=CLIENT, destination=PAYMENTS),
        "F8": _flow(8, ip_version=0, ethertype=0x0806, traffic_direction=TrafficDirection.EGRESS, packets=1, bytes=42,
                    ifname="veth-front", ifindex=7),
        "F9": _flow(9, ip_version=6, ethertype=0x86DD, src_ip="fd00::1", dst_ip="fd00::2", protocol=17,
                    src_port=5000, dst_port=6000, packets=4, bytes=400, source_names=("api.internal.test",)),
    }


def lost() -> LostEvents:
    return LostEvents(T0 + 10_000_000_000, "PERF_EVENT_RING_BUFFER", 3, "node-1")
