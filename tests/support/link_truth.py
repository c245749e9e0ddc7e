"""flowtel's flows on a pod's host-side veth set against the kernel's own link counters.

On a host-side veth what the interface received (tc ingress, ``rx``) is what the pod sent:
flowtel reports it as the pod's EGRESS, and what the veth sent (``tx``) as its INGRESS.
"""
from __future__ import annotations

from typing import Iterable

from flowtel.records import Flow, TrafficDirection
from testbed import LinkStats

DIRECTIONS = (TrafficDirection.EGRESS, TrafficDirection.INGRESS)


def flow_totals(flows: Iterable[Flow], ifindex: int) -> dict[TrafficDirection, tuple[int, int]]:
    """(packets, bytes) of the flows seen on interface ``ifindex``, per traffic direction."""
    totals = {direction: [0, 0] for direction in DIRECTIONS}
    for f in flows:
        if f.ifindex == ifindex and f.traffic_direction in totals:
            t = totals[f.traffic_direction]
            t[0] += f.packets
            t[1] += f.bytes
    return {direction: (t[0], t[1]) for direction, t in totals.items()}


def link_totals(delta: LinkStats) -> dict[TrafficDirection, tuple[int, int]]:
    """The same, as the veth's own counters (``ip -s link`` deltas) give it."""
    return {TrafficDirection.EGRESS: (delta.rx_packets, delta.rx_bytes),
            TrafficDirection.INGRESS: (delta.tx_packets, delta.tx_bytes)}
